"""A trained model as a folder (`best.pt` + `config.json`) and its evaluation on the test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.config import with_overrides
from trainer.data import load_data
from trainer.device import resolve_runtime
from trainer.evaluate import evaluate
from trainer.saved_model import load_model, saved_config


def export_model(best: str | Path, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Copy a `best.pt` into `out` with its config as JSON beside it (`python -m trainer
    --config out/config.json` retrains it; `--evaluate out` tests it). Checks the file first;
    `best` may also be the checkpoint_dir holding it."""
    best = Path(best)
    if best.is_dir():
        best = best / checkpoint.BEST
    payload = checkpoint.load(best)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / checkpoint.BEST
    # Exporting into the checkpoint_dir itself only adds config.json; copyfile would refuse.
    if not (target.exists() and target.samefile(best)):
        shutil.copyfile(best, target)
    config = {k: v for k, v in payload["config"].items() if k not in ("checkpoint_dir", "fault")}
    (out / "config.json").write_text(
        json.dumps({"config": config, "metrics": payload["metrics"], **(extra or {})}, indent=2)
        + "\n"
    )
    return out


def evaluate_saved(path: str | Path, device: str = "auto") -> dict[str, Any]:
    """Test metrics of a saved model on the same split it was trained with."""
    rt = resolve_runtime(device, "off")
    model, payload = load_model(path, rt.device)
    cfg = with_overrides(saved_config(payload), {"device": device})
    rt = resolve_runtime(device, cfg.amp)
    data = load_data(cfg, rt.device)
    mean = torch.tensor(payload["data"]["mean"], device=rt.device)
    std = torch.tensor(payload["data"]["std"], device=rt.device)
    test = evaluate(model, data, "test", rt, batch_size=cfg.eval_batch_size, mean=mean, std=std,
                    confusion=True)
    return {
        "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
        "test_macro_f1": test["macro_f1"], "test_f1": test["f1"], "confusion": test["confusion"],
        "checkpoint": str(path),
    }
