"""Device choice for local workers, tested on the CPU: which device each of `hpo run`'s workers
gets on machines with 0, 1 or several GPUs, and the per-GPU claim of `cuda:free`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer.device import NoFreeDevice, claim_free_index, local_devices, spread


@pytest.mark.parametrize(("name", "workers", "gpus", "want"), [
    ("auto", 4, 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("auto", 3, 2, ["cuda:0", "cuda:1", "cuda:0"]),  # more workers than GPUs: shared evenly
    ("cuda", 2, 8, ["cuda:0", "cuda:1"]),
    ("auto", 2, 0, ["auto", "auto"]),  # no GPU: auto is the CPU in each worker
    ("cuda:3", 2, 4, ["cuda:3", "cuda:3"]),  # an explicit device is the user's choice
    ("cuda:free", 2, 4, ["cuda:free", "cuda:free"]),  # each worker claims one itself
    ("cpu", 3, 4, ["cpu"] * 3),
])
def test_local_workers_go_round_the_gpus(
    name: str, workers: int, gpus: int, want: list[str]
) -> None:
    assert spread(name, workers, gpus) == want


def test_on_this_machine_the_count_comes_from_torch() -> None:
    gpus = torch.cuda.device_count()
    assert local_devices("auto", 2) == spread("auto", 2, gpus)


def test_free_gpu_claims_are_exclusive_until_released(tmp_path: Path) -> None:
    first, fd0 = claim_free_index(str(tmp_path), 2)
    second, fd1 = claim_free_index(str(tmp_path), 2)
    assert (first, second) == (0, 1)
    with pytest.raises(NoFreeDevice, match="all 2 GPU"):
        claim_free_index(str(tmp_path), 2)
    os.close(fd0)  # as when the worker holding it dies
    again, fd2 = claim_free_index(str(tmp_path), 2)
    assert again == 0
    os.close(fd1)
    os.close(fd2)
