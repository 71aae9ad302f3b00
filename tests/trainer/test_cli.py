"""Contracts of `python -m trainer`, run as a real subprocess: JSON on the last stdout line, config
files (TOML and JSON) that flags override, one clear stderr line and exit code 2 for anything the
user got wrong, and `--evaluate` of an exported model agreeing with its training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.__main__ import _config_from, _parser, main
from trainer.export import export_model

ROOT = Path(__file__).resolve().parents[2]
# One torch thread, as in the test process; PYTHONPATH so the package is found from any cwd.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
SMALL = ["--dataset", "digits", "--model", "resnet20", "--width", "0.25", "--batch-size", "64"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300, check=False,
    )  # fmt: skip


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The metrics a CLI training run printed, and its checkpoint_dir."""
    where = tmp_path_factory.mktemp("cli")
    proc = run(*SMALL, "--epochs", "2", "--crop-pad", "0", "--checkpoint-dir", "ckpt", "--json",
               cwd=where)
    return last_json(proc), where / "ckpt"


def test_training_prints_its_metrics_as_json_last(trained: tuple[dict[str, Any], Path]) -> None:
    metrics, ckpt = trained
    assert 0.0 <= metrics["val_acc"] <= 1.0 and 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["val_acc"] > 0.3  # two epochs of learning, not chance (0.1)
    assert len(metrics["history"]) == 2
    assert metrics["config"]["width"] == 0.25 and metrics["config"]["batch_size"] == 64
    assert (ckpt / "best.pt").is_file() and (ckpt / "last.pt").is_file()


def test_evaluate_of_the_export_prints_the_same_test_acc(
    trained: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    metrics, ckpt = trained
    out = export_model(ckpt / "best.pt", tmp_path / "exported")
    evaluated = last_json(run("--evaluate", str(out), "--json", cwd=tmp_path))
    assert evaluated["test_acc"] == metrics["test_acc"]
    assert evaluated["confusion"] == metrics["confusion"]


def run_here(
    *args: str, capsys: pytest.CaptureFixture[str]
) -> subprocess.CompletedProcess[str]:
    """`main(args)` in this process: the same code as `python -m trainer`, without a second
    interpreter importing torch (5 to 15 s on a busy machine). Used where the subprocess
    boundary adds nothing that the subprocess tests do not already check."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "trainer", *args], code, out, err)


CONFIG_FIELDS = {"model": "resnet20", "width": 0.25, "epochs": 5, "batch_size": 64, "lr": 0.2,
                 "crop_pad": 0, "seed": 3, "label_smoothing": 0.05}


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_is_read_and_flags_override_it(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"cfg{suffix}"
    args = ("--config", str(path), "--epochs", "1", "--seed", "4", "--best-metric", "val_loss",
            "--json")
    if suffix == ".toml":
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in CONFIG_FIELDS.items()))
        metrics = last_json(run(*args, cwd=tmp_path))
    else:
        path.write_text(json.dumps(CONFIG_FIELDS))
        metrics = last_json(run_here(*args, capsys=capsys))
    config = metrics["config"]
    assert (config["epochs"], config["seed"]) == (1, 4)  # the flags win
    assert config["best_metric"] == "val_loss"
    assert (config["lr"], config["width"], config["label_smoothing"]) == (0.2, 0.25, 0.05)
    assert len(metrics["history"]) == 1


def test_focal_loss_and_unfreezing_flags_set_their_fields() -> None:
    args = _parser().parse_args(["--loss", "focal", "--focal-gamma", "1.5", "--freeze-stages", "2",
                                 "--unfreeze-every", "3"])
    config = _config_from(args)
    assert (config.loss, config.focal_gamma) == ("focal", 1.5)
    assert (config.freeze_stages, config.unfreeze_every) == (2, 3)


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


# (arguments given a tmp_path, words the one stderr line must contain)
BAD_INPUT = {
    "unknown field in toml": (
        lambda d: ["--config", _write(d, "c.toml", 'model = "resnet20"\nwidht = 0.5\n')],
        ["widht", "c.toml"],
    ),
    "unknown field in json": (
        lambda d: ["--config", _write(d, "c.json", '{"epochs": 1, "learning_rate": 0.1}')],
        ["learning_rate", "c.json"],
    ),
    "bad value in a wrapped export": (
        lambda d: ["--config", _write(d, "c.json", '{"config": {"width": -1}, "metrics": {}}')],
        ["width", "c.json"],
    ),
    "wrong type in toml": (
        lambda d: ["--config", _write(d, "c.toml", 'epochs = "ten"\n')],
        ["epochs", "integer"],
    ),
    "not toml": (
        lambda d: ["--config", _write(d, "c.toml", "epochs = = 1\n")],
        ["c.toml", "TOML"],
    ),
    "missing file": (lambda d: ["--config", "absent.toml"], ["absent.toml"]),
    "unknown model": (lambda d: [*SMALL, "--model", "resnet7"], ["model", "resnet7"]),
    "flag out of range": (lambda d: ["--epochs", "0"], ["epochs"]),
    "unknown loss": (lambda d: ["--loss", "focall"], ["loss", "focall", "cross_entropy, focal"]),
    "negative focal gamma": (lambda d: ["--focal-gamma=-0.5"], ["focal_gamma", "-0.5"]),
    "negative unfreeze_every": (lambda d: ["--freeze-stages", "2", "--unfreeze-every=-1"],
                                ["unfreeze_every", "-1"]),
    "unfreezing without frozen stages": (lambda d: ["--unfreeze-every", "2"],
                                         ["unfreeze_every", "freeze_stages is 0"]),
    "negative patience": (lambda d: ["--early-stop-patience", "-1"], ["early_stop_patience"]),
    "not a validation metric": (lambda d: ["--best-metric", "test_acc"],
                                ["best_metric", "test_acc", "val_loss"]),
    "nothing to evaluate": (lambda d: ["--evaluate", str(d)], ["best.pt", "does not exist"]),
}
# Every case but the last fails before torch is imported, so a subprocess costs little; the
# last imports the whole trainer and is run in this process.
IN_PROCESS = {"nothing to evaluate"}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_args, words = BAD_INPUT[case]
    if case in IN_PROCESS:
        proc = run_here(*make_args(tmp_path), capsys=capsys)
    else:
        proc = run(*make_args(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert list(tmp_path.glob("**/*.pt")) == []  # nothing written


def test_without_json_it_prints_a_readable_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = run_here(*SMALL, "--epochs", "1", "--crop-pad", "0", capsys=capsys)
    assert proc.returncode == 0
    assert any(line.split(":")[0].strip() == "test_acc" for line in proc.stdout.splitlines())
    assert "epoch 1: train_loss" in proc.stderr  # the per-epoch report, beside the progress bar
