"""A trained model as a folder (`best.pt` + `config.json`), ensembles of several, and their
evaluation on the test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.augment import mean_std_tensors
from trainer.config import with_overrides
from trainer.contract import MAX_DROP
from trainer.data import load_data
from trainer.device import resolve_runtime
from trainer.evaluate import as_test_metrics, evaluate
from trainer.files import write_atomic, write_atomic_with
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
    # Exporting into the checkpoint_dir itself only adds config.json.
    if not (target.exists() and target.samefile(best)):
        with best.open("rb") as source:
            write_atomic_with(target, lambda f: shutil.copyfileobj(source, f))
    config = {k: v for k, v in payload["config"].items() if k not in ("checkpoint_dir", "fault")}
    info = {"config": config, "metrics": payload["metrics"], **(extra or {})}
    write_atomic(out / "config.json", (json.dumps(info, indent=2) + "\n").encode())
    return out


def evaluate_saved(
    path: str | Path, device: str = "auto", amp: str | None = None
) -> dict[str, Any]:
    """Test metrics of a saved model on the same split it was trained with (of an ensemble
    export: `evaluate_ensemble`), at the precision it was trained with unless `amp` says."""
    if Path(path).is_dir() and _is_ensemble(Path(path)):
        return evaluate_ensemble(path, device, amp)
    rt = resolve_runtime(device, "off")
    model, payload = load_model(path, rt.device)
    saved = saved_config(payload)
    cfg = with_overrides(saved, {"device": device, "amp": amp or saved.amp})
    rt = resolve_runtime(device, cfg.amp)
    data = load_data(cfg, rt.device)
    # The model's own normalisation, as it was trained: the checkpoint's, not a recomputation.
    mean, std = mean_std_tensors(payload["data"]["mean"], payload["data"]["std"], rt.device)
    test = evaluate(model, data, "test", rt, batch_size=cfg.eval_batch_size, mean=mean, std=std,
                    confusion=True)
    return {**as_test_metrics(test), "checkpoint": str(path)}


def _is_ensemble(folder: Path) -> bool:
    from trainer.bundle import CONFIG, ENSEMBLE, read_info

    return (folder / CONFIG).is_file() and read_info(folder).get("kind") == ENSEMBLE


def export_bundle(bests: list[Path], out: str | Path, members: list[dict[str, Any]],
                  formats: list[str], quantize: str | None = None,
                  max_drop: float = MAX_DROP) -> tuple[Path, dict[str, Any]]:
    """One model (a single `bests`) or an ensemble that averages the members' softmax, plus the
    portable `formats` (trainer.portable) and, with `quantize="int8"`, the int8 ONNX model
    (trainer.quantize; it implies the fp32 ONNX file, which it is measured against). Everything
    is loaded and checked before anything is written. Returns the folder and the checks."""
    from trainer.bundle import CONFIG, ENSEMBLE, from_checkpoints
    from trainer.portable import FILES, portable_files
    from trainer.quantize import check_max_drop, check_mode, int8_file

    check_mode(quantize)
    check_max_drop(max_drop)
    if quantize and "onnx" not in formats:
        formats = [*formats, "onnx"]
    bundle = from_checkpoints(bests, members)  # refuses members of different data
    cfg = saved_config(checkpoint.load(bests[0]))
    files, checks = portable_files(bundle, cfg, formats)
    if quantize:
        model, check = int8_file(bundle, files[FILES["onnx"]], cfg, max_drop)
        files[check["file"]], checks[quantize] = model, check
    out = Path(out)
    if len(bests) == 1:
        export_model(bests[0], out, extra={**members[0], **({"exports": checks} if checks else {})})
    else:
        for i, (best, meta) in enumerate(zip(bests, members, strict=True)):
            export_model(best, out / f"member-{i + 1}", extra=meta)
        # The members' order is their rank: member-1 is the single best model.
        info = {"kind": ENSEMBLE, "average": "softmax",
                "members": [{"dir": f"member-{i + 1}", **m} for i, m in enumerate(members)],
                "classes": bundle.classes, "image_size": bundle.image_size,
                "in_channels": bundle.in_channels, "exports": checks}
        write_atomic(out / CONFIG, (json.dumps(info, indent=2) + "\n").encode())
    for name, data in files.items():
        write_atomic(out / name, data)
    return out, checks


def evaluate_ensemble(
    path: str | Path, device: str = "auto", amp: str | None = None
) -> dict[str, Any]:
    """Test metrics of an ensemble export and, under "single_best", of its best member alone."""
    from trainer.bundle import load_export, member_folders

    rt = resolve_runtime(device, "off")
    bundle = load_export(path, rt.device)
    first = member_folders(Path(path))[0]
    saved = saved_config(checkpoint.load(first / checkpoint.BEST))
    cfg = with_overrides(saved, {"device": device, "amp": amp or saved.amp})
    rt = resolve_runtime(device, cfg.amp)
    data = load_data(cfg, rt.device)
    # The ServingModule normalises per member: give it plain [0, 1] pixels.
    zeros = torch.zeros(bundle.in_channels, device=rt.device)
    ones = torch.ones(bundle.in_channels, device=rt.device)
    test = evaluate(bundle.module.to(rt.device), data, "test", rt,
                    batch_size=cfg.eval_batch_size, mean=zeros, std=ones, confusion=True)
    return {
        **as_test_metrics(test), "members": len(bundle.members), "checkpoint": str(path),
        "single_best": evaluate_saved(first, device, amp),
    }
