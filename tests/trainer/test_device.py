"""Device choice for local workers, tested on the CPU: which device each of `hpo run`'s workers
gets on machines with 0, 1 or several GPUs, the (GPU, slot) claims of `cuda:free[:K]` made by
real processes through lock files, and the memory cap a shared GPU's worker sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.device import (
    MAX_SLOTS,
    WORKERS_PER_GPU_ENV,
    ConfigError,
    NoFreeDevice,
    claim_device,
    claim_free_slot,
    cpu_has_native_bf16,
    free_slots,
    local_devices,
    memory_fraction,
    resolve_runtime,
    spread,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "workers", "gpus", "want"), [
    ("auto", 4, 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    # More workers than GPUs: they share the GPUs by slots, ceil(3 / 2) = 2 on each.
    ("auto", 3, 2, ["cuda:free:2"] * 3),
    ("auto", 8, 2, ["cuda:free:4"] * 8),
    ("cuda", 2, 8, ["cuda:0", "cuda:1"]),
    ("auto", 2, 0, ["auto", "auto"]),  # no GPU: auto is the CPU in each worker
    ("cuda:3", 2, 4, ["cuda:3", "cuda:3"]),  # an explicit device is the user's choice
    ("cuda:free", 2, 4, ["cuda:free", "cuda:free"]),  # each worker claims one itself
    ("cuda:free:4", 3, 1, ["cuda:free:4"] * 3),
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
    first = claim_free_slot(str(tmp_path), 2)
    second = claim_free_slot(str(tmp_path), 2)
    assert (first.gpu, second.gpu) == (0, 1)
    with pytest.raises(NoFreeDevice, match="all 2 GPU"):
        claim_free_slot(str(tmp_path), 2)
    os.close(first.fd)  # as when the worker holding it dies
    again = claim_free_slot(str(tmp_path), 2)
    assert (again.gpu, again.slot) == (0, 0)
    os.close(second.fd)
    os.close(again.fd)


def test_slots_fill_every_gpu_before_doubling_up(tmp_path: Path) -> None:
    claims = [claim_free_slot(str(tmp_path), 2, 2) for _ in range(4)]
    assert [(c.gpu, c.slot) for c in claims] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # Slot 0 keeps the one-worker-per-GPU file name, so old and new workers see each other.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu0.lock", "gpu0.slot1.lock", "gpu1.lock", "gpu1.slot1.lock"]
    for c in claims:
        os.close(c.fd)


# A worker's claim as a separate process: it prints its (gpu, slot) or its NoFreeDevice, then
# holds the claim until its stdin closes, so every claim is held while the others are made.
_CLAIMANT = """
import json, sys
from trainer.device import NoFreeDevice, claim_free_slot
try:
    slot = claim_free_slot(sys.argv[1], gpus=2, slots=2)
    print(json.dumps([slot.gpu, slot.slot]), flush=True)
except NoFreeDevice as e:
    print(json.dumps(str(e)), flush=True)
sys.stdin.read()
"""


def test_five_processes_claim_two_gpus_of_two_slots(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMANT, str(tmp_path / "locks")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(5)]
    try:
        answers = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=60)
    claimed = sorted(tuple(a) for a in answers if isinstance(a, list))
    refused = [a for a in answers if isinstance(a, str)]
    assert claimed == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(refused) == 1 and "all 2 GPU(s) x 2 worker slot(s) are claimed" in refused[0]


@pytest.mark.parametrize(("name", "env", "want"), [
    ("cuda:free", {}, 1),
    ("cuda:free", {WORKERS_PER_GPU_ENV: "4"}, 4),
    ("cuda:free", {WORKERS_PER_GPU_ENV: " "}, 1),  # a compose default left empty
    ("cuda:free:3", {WORKERS_PER_GPU_ENV: "4"}, 3),  # the name wins over the environment
    (f"cuda:free:{MAX_SLOTS}", {}, MAX_SLOTS),
    ("cuda:1", {WORKERS_PER_GPU_ENV: "4"}, None),
    ("auto", {}, None),
])
def test_slots_per_gpu_from_the_name_or_the_environment(
    name: str, env: dict[str, str], want: int | None
) -> None:
    assert free_slots(name, env) == want


@pytest.mark.parametrize(("name", "env", "names"), [
    ("cuda:free:0", {}, "device: 'cuda:free:0'"),
    ("cuda:free:", {}, "device: 'cuda:free:'"),
    ("cuda:free:two", {}, "device: 'cuda:free:two'"),
    ("cuda:free:-1", {}, "device: 'cuda:free:-1'"),
    ("cuda:free:²", {}, "device: 'cuda:free:²'"),
    (f"cuda:free:{MAX_SLOTS + 1}", {}, f"device: 'cuda:free:{MAX_SLOTS + 1}'"),
    ("cuda:free", {WORKERS_PER_GPU_ENV: "0"}, f"{WORKERS_PER_GPU_ENV}='0'"),
    ("cuda:free", {WORKERS_PER_GPU_ENV: "1.5"}, f"{WORKERS_PER_GPU_ENV}='1.5'"),
])
def test_a_bad_slot_count_is_a_clear_error(name: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match="workers per GPU must be a whole number") as info:
        free_slots(name, env)
    assert str(info.value).startswith(names)


@pytest.mark.parametrize(("slots", "fraction"), [(1, 1.0), (2, 0.5), (4, 0.25), (8, 0.125)])
def test_memory_fraction_is_one_slot_of_the_gpu(slots: int, fraction: float) -> None:
    assert memory_fraction(slots) == fraction


def test_a_shared_gpu_caps_each_workers_memory_at_its_slot(tmp_path: Path) -> None:
    capped: list[tuple[float, int]] = []

    def limit(fraction: float, gpu: int) -> None:
        capped.append((fraction, gpu))

    first = claim_device("cuda:free:4", str(tmp_path), gpus=2, limit=limit)
    second = claim_device("cuda:free:4", str(tmp_path), gpus=2, limit=limit)
    assert (first[0], second[0]) == ("cuda:0", "cuda:1")
    assert capped == [(0.25, 0), (0.25, 1)]
    # One worker per GPU keeps the whole GPU, as before slots: no cap is set.
    alone = claim_device("cuda:free", str(tmp_path / "other"), gpus=1, limit=limit)
    assert alone[0] == "cuda:0" and len(capped) == 2
    for _, fd in (first, second, alone):
        assert fd is not None
        os.close(fd)


def test_a_failed_cap_releases_the_claim(tmp_path: Path) -> None:
    def limit(fraction: float, gpu: int) -> None:
        raise RuntimeError("no such device")

    with pytest.raises(RuntimeError):
        claim_device("cuda:free:2", str(tmp_path), gpus=1, limit=limit)
    slot = claim_free_slot(str(tmp_path), 1, 2)
    assert (slot.gpu, slot.slot) == (0, 0)
    os.close(slot.fd)


def test_other_names_pass_through_unclaimed(tmp_path: Path) -> None:
    assert claim_device("cuda:1", str(tmp_path)) == ("cuda:1", None)
    assert claim_device("cpu", str(tmp_path)) == ("cpu", None)
    assert not tmp_path.joinpath("gpu0.lock").exists()


def test_auto_precision_on_the_cpu_is_bf16_only_where_it_is_native() -> None:
    # bench/cpu_bf16.py: no accuracy lost on digits over five seeds (BENCHMARKS.md).
    caps = torch.cpu.get_capabilities()
    assert cpu_has_native_bf16() == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    auto = resolve_runtime("cpu", "auto")
    assert auto.amp_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert not auto.use_scaler and not auto.channels_last
    assert resolve_runtime("cpu", "off").amp_dtype is None  # asked for: fp32 everywhere
