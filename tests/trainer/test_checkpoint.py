"""Contracts of `trainer.checkpoint`, `trainer.saved_model` and `trainer.export`: checkpoints are
written atomically and read as plain data only (a crafted pickle is refused by every reader and
never runs), and an exported model evaluates to exactly the test metrics of its training run."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.export import evaluate_saved, export_model
from trainer.saved_model import load_model
from trainer.train import Result, train

FAST = TrainConfig(
    dataset="digits", model="resnet20", width=0.25, batch_size=64, lr=0.2, crop_pad=0,
    epochs=2, device="cpu",
)  # fmt: skip


class _Exploit:
    """Unpickling this calls open(marker, "w"): the marker file shows that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _write_raw(path: Path, payload: dict[str, Any]) -> None:
    path.write_bytes(pickle.dumps(payload))


def _write_torch(path: Path, payload: dict[str, Any]) -> None:
    torch.save(payload, path)


def _crafted(path: Path, marker: Path, write: Callable[[Path, dict[str, Any]], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, {"format": checkpoint.FORMAT, "model": _Exploit(marker), "epoch": 1})
    return path


def test_the_crafted_file_would_run_code_if_unpickled(tmp_path: Path) -> None:
    # Without this, "the marker is absent" below could pass because the exploit is broken.
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "x.pt", marker, _write_raw)
    with path.open("rb") as f:
        pickle.load(f)
    assert marker.exists()


# torch warns that it may not read a protocol-4 pickle: it refuses it, which is the point.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("write", [_write_raw, _write_torch], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("name", [checkpoint.LAST, checkpoint.BEST])
def test_a_crafted_checkpoint_is_refused_and_never_runs(
    tmp_path: Path, name: str, write: Callable[[Path, dict[str, Any]], None]
) -> None:
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "ckpt" / name, marker, write)
    with pytest.raises(ConfigError, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()


READERS: dict[str, Callable[[Path, Path], object]] = {
    "resume": lambda d, _: train(replace(FAST, checkpoint_dir=str(d))),
    "pretrained": lambda d, _: train(replace(FAST, pretrained=str(d / checkpoint.LAST))),
    "teacher": lambda d, _: train(replace(FAST, teacher=str(d / checkpoint.BEST), kd_alpha=0.5)),
    "load_model": lambda d, _: load_model(d, torch.device("cpu")),
    "export": lambda d, out: export_model(d / checkpoint.BEST, out),
    "evaluate": lambda d, _: evaluate_saved(d),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_crafted_checkpoint(tmp_path: Path, reader: str) -> None:
    marker = tmp_path / "ran"
    folder = tmp_path / "ckpt"
    for name in (checkpoint.LAST, checkpoint.BEST):
        _crafted(folder / name, marker, _write_torch)
    out = tmp_path / "export"
    with pytest.raises(ConfigError):
        READERS[reader](folder, out)
    assert not marker.exists()
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == [checkpoint.BEST, checkpoint.LAST]


def test_a_file_of_someone_else_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(3)}, plain)  # a fine state dict, but not our format
    with pytest.raises(ConfigError, match="not written by this trainer"):
        checkpoint.load(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="refused"):
        checkpoint.load(garbage)
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint.load(tmp_path / "absent.pt")


def test_save_round_trips_and_a_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / checkpoint.LAST
    payload = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"val_acc": 0.5}]}
    checkpoint.save(path, payload)
    loaded = checkpoint.load(path)
    assert loaded["format"] == checkpoint.FORMAT
    assert loaded["epoch"] == 3 and loaded["history"] == [{"val_acc": 0.5}]
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))

    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        checkpoint.save(path, {"epoch": 4, "unpicklable": lambda: None})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [checkpoint.LAST]  # no temporary left


# --- export and evaluation of a trained model ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Result:
    return train(replace(FAST, checkpoint_dir=str(tmp_path_factory.mktemp("run"))))


def test_checkpoints_hold_what_resume_and_export_need(trained: Result) -> None:
    where = Path(trained.checkpoint).parent
    last = checkpoint.load(where / checkpoint.LAST)
    best = checkpoint.load(where / checkpoint.BEST)
    assert last["epoch"] == FAST.epochs and len(last["history"]) == FAST.epochs
    assert {"model", "optimizer", "scaler", "micro_batch", "best", "config", "data"} <= set(last)
    assert best["epoch"] == trained.best_epoch
    assert best["metrics"]["val_acc"] == trained.val_acc
    assert best["data"]["num_classes"] == 10 and best["data"]["in_channels"] == 1
    assert best["data"]["record"] == trained.data


def test_exported_model_reproduces_the_test_metrics_exactly(
    trained: Result, tmp_path: Path
) -> None:
    out = export_model(trained.checkpoint, tmp_path / "model", extra={"note": "digits"})
    saved = json.loads((out / "config.json").read_text())
    assert saved["note"] == "digits"
    assert saved["metrics"]["val_acc"] == trained.val_acc
    assert "checkpoint_dir" not in saved["config"] and "fault" not in saved["config"]
    assert saved["config"]["width"] == FAST.width

    for target in (out, out / checkpoint.BEST):
        metrics = evaluate_saved(target, device="cpu")
        assert metrics["test_acc"] == trained.test_acc
        assert metrics["test_loss"] == trained.test_loss
        assert metrics["confusion"] == trained.confusion
        assert metrics["test_f1"] == trained.test_f1


def test_export_accepts_the_checkpoint_dir_and_may_write_into_it(
    trained: Result, tmp_path: Path
) -> None:
    where = Path(trained.checkpoint).parent
    before = (where / checkpoint.BEST).read_bytes()
    export_model(where, where)  # the same file: only config.json is added
    assert (where / checkpoint.BEST).read_bytes() == before
    assert (where / "config.json").exists()
    assert evaluate_saved(where, device="cpu")["test_acc"] == trained.test_acc
