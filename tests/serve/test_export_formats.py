"""`hpo export --top K --format ...` on the shared finished study: the ensemble of the top 3 is
evaluated on the test split beside the single best; the ONNX and TorchScript files reproduce
PyTorch's probabilities on the whole test split within the stated tolerance (checked here again,
independently of the check export ran); bad requests exit 2 and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.helpers import hpo
from tests.serve.helpers import run_module
from trainer.bundle import load_export
from trainer.portable import TOLERANCE, split_images
from trainer.predict import Predictor, to_input
from trainer.saved_model import load_model, saved_config


def _ranked_trials(url: str) -> list[tuple[float, str, int]]:
    import optuna

    found = []
    for index, stage in enumerate(("optimizer", "regularization")):
        study = optuna.load_study(study_name=f"done/{stage}", storage=url)
        found += [(-t.value, index, t.number, stage) for t in study.get_trials(deepcopy=False)
                  if t.state == optuna.trial.TrialState.COMPLETE]
    return [(-v, stage, n) for v, _, n, stage in sorted(found)]


def test_the_top3_ensemble_is_evaluated_beside_the_single_best(
    finished_study: tuple[str, Path], exports: dict[str, Path]
) -> None:
    url, cwd = finished_study
    folder = exports["ensemble"]
    info = json.loads((folder / "config.json").read_text())
    assert info["kind"] == "ensemble" and info["average"] == "softmax"
    ranked = _ranked_trials(url)[:3]
    assert [(m["stage"], m["trial"]) for m in info["members"]] == [(s, n) for _, s, n in ranked]

    # fp32, as the ensemble is computed by hand below: amp=auto may be bf16 on this CPU.
    run = run_module(["trainer", "--evaluate", str(folder), "--device", "cpu", "--amp", "off",
                      "--json"], cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads(run.stdout.splitlines()[-1])
    single = run_module(["trainer", "--evaluate", str(folder / "member-1"), "--device", "cpu",
                         "--amp", "off", "--json"], cwd=cwd)
    assert json.loads(single.stdout.splitlines()[-1])["test_acc"] == \
        metrics["single_best"]["test_acc"]
    # The ensemble's accuracy is that of the averaged softmax, computed here by hand.
    bundle = load_export(folder)
    images = split_images(saved_config(torch.load(folder / "member-1" / "best.pt",
                                                 weights_only=True)), limit=10**9)
    probs = torch.zeros(len(images), len(bundle.classes))
    for member in ("member-1", "member-2", "member-3"):
        model, payload = load_model(folder / member, torch.device("cpu"))
        mean = torch.tensor(payload["data"]["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(payload["data"]["std"]).view(1, -1, 1, 1)
        with torch.inference_mode():
            probs += torch.softmax(model((images.float() / 255 - mean) / std), 1)
    labels = _test_labels(folder)
    correct = int((probs.argmax(1) == labels).sum())
    assert round(metrics["test_acc"] * len(labels)) == correct

    table = run_module(["trainer", "--evaluate", str(folder), "--device", "cpu", "--amp", "off"],
                       cwd=cwd)
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert "ensemble of 3" in lines[0] and "single best" in lines[0]
    acc = next(line for line in lines if line.strip().startswith("test_acc")).split()
    assert acc[1:] == [f"{metrics['test_acc']:.4f}", f"{metrics['single_best']['test_acc']:.4f}"]


def _test_labels(folder: Path) -> torch.Tensor:
    from trainer.config import with_overrides
    from trainer.data import load_data

    cfg = saved_config(torch.load(folder / "member-1" / "best.pt", weights_only=True))
    data = load_data(with_overrides(cfg, {"device": "cpu"}), torch.device("cpu"))
    return torch.cat([y for _, y in data.eval_batches("test", 512)])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_and_torchscript_match_pytorch_on_the_test_split(exports: dict[str, Path]) -> None:
    for name, formats in (("single", ("onnx", "torchscript")), ("ensemble", ("onnx",))):
        folder = exports[name]
        info = json.loads((folder / "config.json").read_text())
        bundle = load_export(folder)
        cfg = saved_config(torch.load(
            (folder / "member-1" if name == "ensemble" else folder) / "best.pt",
            weights_only=True))
        images = split_images(cfg, limit=10**9)
        assert len(images) == 360  # digits: 20% of 1797 images
        want = Predictor(bundle, "torch").probabilities(images)
        session = ort.InferenceSession(str(folder / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        got = {"onnx": np.exp(session.run(None, {"pixels": to_input(images).numpy()})[0])}
        if "torchscript" in formats:
            scripted = torch.jit.load(str(folder / "model.ts"))
            with torch.inference_mode():
                got["torchscript"] = scripted(to_input(images)).exp().numpy()
        for fmt in formats:
            diff = float(np.abs(got[fmt] - want.numpy()).max())
            assert diff <= TOLERANCE, (name, fmt, diff)
            assert (got[fmt].argmax(1) == want.numpy().argmax(1)).all(), (name, fmt)
            check = info["exports"][fmt]
            assert check["images"] == 360 and check["max_abs_diff"] <= check["tolerance"]
            assert check["tolerance"] == TOLERANCE


def test_bad_export_requests_exit_2_and_write_nothing(
    finished_study: tuple[str, Path], tmp_path: Path
) -> None:
    url, cwd = finished_study
    for args, words in ((["--format", "tensorflow"], "--format 'tensorflow'"),
                        (["--top", "99"], "only"), (["--top", "0"], "at least 1")):
        out = tmp_path / "out"
        run = hpo("export", "done", "--out", str(out), *args, url=url, cwd=cwd)
        assert run.returncode == 2, (args, run.stderr[-2000:])
        assert words in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not out.exists()
