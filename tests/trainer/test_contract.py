"""`trainer.contract`, `trainer.errors`, `trainer.config` and `trainer.files` are what a caller
outside the trainer imports before it trains, if it ever does: none of them may import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import checkpoint, contract, errors, train
from trainer.config import TrainConfig

ROOT = Path(__file__).parents[2]  # this tree's trainer/, whatever the venv installed


def _imports_torch(module: str) -> bool:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", ["trainer.contract", "trainer.errors", "trainer.config",
                                    "trainer.files"])
def test_importing_the_contract_does_not_import_torch(module: str) -> None:
    assert not _imports_torch(module)


def test_the_check_sees_torch_where_it_is_imported() -> None:
    assert _imports_torch("trainer.checkpoint")  # else the test above could not fail


def test_the_trainer_uses_the_contract_names() -> None:
    assert (checkpoint.BEST, checkpoint.LAST) == (contract.BEST, contract.LAST)
    assert train.Result is contract.Result
    assert contract.Diverged is errors.Diverged and contract.ConfigError is errors.ConfigError
    assert issubclass(contract.DataUnavailable, contract.ConfigError)
    assert issubclass(contract.NoFreeDevice, contract.ConfigError)


def test_every_metric_with_a_direction_is_one_the_run_records() -> None:
    # The keys of an epoch's history that are validation metrics: exactly the ones with a
    # direction (and so the values best_metric takes).
    assert set(contract.METRIC_DIRECTIONS) == {"val_acc", "val_top5", "val_loss"}
    assert TrainConfig().best_metric in contract.METRIC_DIRECTIONS


@pytest.mark.parametrize(("metric", "value", "than", "better"), [
    ("val_acc", 0.9, 0.8, True), ("val_acc", 0.8, 0.8, False), ("val_loss", 0.3, 0.4, True),
    ("val_loss", 0.4, 0.4, False), ("val_loss", 0.5, 0.4, False), ("val_top5", 1.0, 0.9, True),
])
def test_is_better_follows_the_direction_and_a_tie_is_not_better(
    metric: str, value: float, than: float, better: bool
) -> None:
    assert contract.is_better(metric, value, than) is better
