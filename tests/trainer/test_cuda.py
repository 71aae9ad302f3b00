"""What only a GPU can show: mixed precision trains as well as fp32, channels_last computes what
NCHW does, a real CUDA out-of-memory is survived with smaller micro-batches, two workers share a
GPU by slots with their memory capped, a compiled trial is reused, and no training step waits
for the device.

Marked `cuda` (`make test-gpu`, or `pytest -m cuda`) and skipped where `torch.cuda.is_available()`
is false. They need trainer/ only (torch, torchvision, numpy, scikit-learn), never search/ or
optuna, so `scripts/gpu-check.sh` runs them on a bare GPU machine: under pytest when it is
installed, otherwise as `python tests/trainer/test_cuda.py`, the small runner at the bottom
(so no test here uses pytest itself, and the only fixture asked for is `tmp_path`).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from trainer import compiled
from trainer.augment import mean_std_tensors, train_transform
from trainer.config import TrainConfig
from trainer.data import load_data
from trainer.device import NoFreeDevice, claim_free_slot, resolve_runtime
from trainer.evaluate import evaluate
from trainer.losses import balanced_weights
from trainer.models import build_model
from trainer.optim import make_optimizer, set_lr
from trainer.schedule import lr_at
from trainer.step import StepRunner
from trainer.train import Result, train

CUDA = torch.cuda.is_available()
SKIP_REASON = "no CUDA device here (torch.cuda.is_available() is False); run on a GPU machine"
ROOT = Path(__file__).resolve().parents[2]

try:
    import pytest

    pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=SKIP_REASON)]
except ImportError:  # a bare GPU machine: `python tests/trainer/test_cuda.py` runs them
    pass

# resnet20 at half width on digits: ~97% validation accuracy in 8 epochs, seconds on a GPU.
DIGITS = TrainConfig(
    dataset="digits", model="resnet20", width=0.5, batch_size=64, lr=0.1, crop_pad=1,
    epochs=8, device="cuda", amp="off",
)  # fmt: skip
SEEDS = (0, 1, 2)


@cache
def _runs(amp: str) -> tuple[Result, ...]:
    return tuple(train(replace(DIGITS, amp=amp, seed=s)) for s in SEEDS)


def _mean_val_acc(runs: tuple[Result, ...]) -> float:
    return statistics.fmean(r.val_acc for r in runs)


def _same_accuracy_as_fp32(amp: str, recorded: str) -> None:
    fp32, mixed = _runs("off"), _runs(amp)
    assert all(r.amp == "off" for r in fp32) and all(r.amp == recorded for r in mixed)
    assert _mean_val_acc(fp32) >= 0.93
    # Over three seeds, within 2 points (6 of 288 validation images) of fp32's mean.
    assert abs(_mean_val_acc(mixed) - _mean_val_acc(fp32)) <= 0.02, (
        [r.val_acc for r in fp32], [r.val_acc for r in mixed])


def test_bf16_trains_digits_as_well_as_fp32() -> None:
    assert not resolve_runtime("cuda", "bf16").use_scaler  # bf16 has fp32's range
    _same_accuracy_as_fp32("bf16", "bfloat16")


def test_fp16_with_loss_scaling_trains_digits_as_well_as_fp32() -> None:
    assert resolve_runtime("cuda", "fp16").use_scaler
    _same_accuracy_as_fp32("fp16", "float16")


def test_channels_last_computes_what_nchw_does_and_stays_channels_last() -> None:
    rt = resolve_runtime("cuda", "off")
    assert rt.channels_last and resolve_runtime("cuda", "auto").channels_last
    cl = torch.channels_last
    torch.manual_seed(0)
    model = build_model(replace(DIGITS, width=1.0), 10, 3).to(rt.device).to(memory_format=cl)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert model.get_submodule("conv1").weight.is_contiguous(memory_format=cl)
    x = torch.randn(64, 3, 32, 32, device=rt.device)
    # TF32 convolutions round differently in the two layouts: a percent, not more.
    torch.testing.assert_close(model(x.contiguous(memory_format=cl)), nchw(x), rtol=2e-2,
                               atol=2e-2)
    optimizer = make_optimizer(model, DIGITS, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    runner = StepRunner(DIGITS, rt, model, optimizer, scaler, None, None)
    set_lr(optimizer, 0.1)
    y = torch.randint(0, 10, (64,), device=rt.device)
    runner.step(x.contiguous(memory_format=cl), y, epoch=1, step=0)
    runner.check_finite()
    for name, p in model.named_parameters():
        if p.ndim == 4:  # the optimizer's update keeps every conv weight NHWC
            assert p.is_contiguous(memory_format=cl), name


# resnet18 (small stem) at 64 px, batch 512: several GB of activations; micro-batches of 32 a
# sixteenth of that.
OOM = TrainConfig(
    dataset="synthetic", image_size=64, model="resnet18", batch_size=512, epochs=1,
    device="cuda", amp="auto", lr=0.1,
)  # fmt: skip


def _peak_bytes(cfg: TrainConfig) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train(cfg)
    return torch.cuda.max_memory_allocated()


def test_a_real_cuda_oom_is_survived_with_smaller_micro_batches() -> None:
    full = _peak_bytes(OOM)
    small = _peak_bytes(replace(OOM, accum_steps=16))
    assert full > 2 * small, (full, small)  # else the gap below could not tell them apart
    torch.cuda.empty_cache()
    # Leave the GPU room for a step of micro-batches of 32 but not of 512: the midpoint, beyond
    # what is allocated now (the cached dataset).
    room = (full + small) // 2 - torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    assert 0 < room < free, (room, free)
    # 64 MiB more room than the midpoint: the driver cannot hand out its last bytes as one block.
    hog = torch.empty(free - room - 2**26, dtype=torch.uint8, device="cuda")
    try:
        result = train(OOM)
    finally:
        del hog
        torch.cuda.empty_cache()
    micro = result.history[0]["micro_batch"]
    assert micro < OOM.batch_size  # a real OutOfMemoryError was raised and recovered from
    assert micro >= 32
    assert result.history[0]["train_loss"] == result.history[0]["train_loss"]  # not NaN


# A worker of a shared GPU in a process of its own: it claims a slot of two, reports its device,
# its allocator's cap and whether 60% of the GPU can be allocated under it, then (once the test
# says so, when both have claimed) trains a short digits run next to the other.
_WORKER = """
import json, sys, torch
from trainer.config import TrainConfig
from trainer.device import claim_device
from trainer.train import train
name, fd = claim_device("cuda:free:2", sys.argv[1])
total = torch.cuda.get_device_properties(name).total_memory
try:
    block = torch.empty(int(0.6 * total), dtype=torch.uint8, device=name)
    over = "allocated"
    del block
except torch.OutOfMemoryError:
    over = "refused"
torch.cuda.empty_cache()
get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
print(json.dumps({"device": name, "over_cap": over,
                  "fraction": get(name) if get else None}), flush=True)
sys.stdin.readline()
cfg = TrainConfig(dataset="digits", model="resnet20", width=0.5, batch_size=64, crop_pad=1,
                  epochs=4, device=name)
result = train(cfg)
print(json.dumps({"val_acc": result.val_acc, "peak_memory_mb": result.peak_memory_mb}),
      flush=True)
"""


def test_two_workers_share_a_gpu_by_slots_with_half_its_memory_each(tmp_path: Path) -> None:
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": first_gpu}
    locks = str(tmp_path / "locks")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, locks], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        claims = [json.loads(_line(p)) for p in procs]
        try:  # a third worker finds both slots of the one GPU taken
            claim_free_slot(locks, 1, 2)
            third = "claimed"
        except NoFreeDevice:
            third = "refused"
        for p in procs:
            _send(p, "go\n")
        trained = [json.loads(_line(p)) for p in procs]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=300)
    assert [c["device"] for c in claims] == ["cuda:0", "cuda:0"]
    assert [c["over_cap"] for c in claims] == ["refused", "refused"]
    assert all(c["fraction"] in (None, 0.5) for c in claims)
    assert third == "refused"
    assert all(t["val_acc"] >= 0.9 for t in trained), trained
    assert [p.returncode for p in procs] == [0, 0]


def _line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"the worker process exited {p.wait()} before answering"
    return line


def _send(p: subprocess.Popen[str], text: str) -> None:
    assert p.stdin is not None
    p.stdin.write(text)
    p.stdin.flush()


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_a_compiled_trial_trains_as_eager_and_the_next_one_reuses_it() -> None:
    cfg = replace(DIGITS, amp="auto", epochs=5)
    compiled.clear_cache()
    eager = train(cfg)
    first = train(replace(cfg, compile=True))
    assert first.compile_seconds > 0
    assert abs(first.val_acc - eager.val_acc) <= 0.04, (eager.val_acc, first.val_acc)
    (entry,) = compiled._cache.values()
    graphs = _graphs()
    second = train(replace(cfg, compile=True, seed=1))
    assert second.compile_seconds == 0.0
    assert next(iter(compiled._cache.values())) is entry and entry.trials == 2
    assert _graphs() == graphs
    assert second.val_acc >= 0.9


def _syncs(run: Callable[[], Any]) -> int:
    """How many times `run` made the host wait for the device (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _steps_without_sync(amp: str) -> None:
    cfg = replace(DIGITS, amp=amp, grad_clip=1.0, jitter=0.2, class_weights="balanced",
                  batch_size=32)
    rt = resolve_runtime("cuda", amp)
    data = load_data(cfg, rt.device)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_classes, data.in_channels).to(rt.device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.use_scaler)
    weight = balanced_weights(data.class_counts()).to(rt.device)
    runner = StepRunner(cfg, rt, model, optimizer, scaler, None, weight)
    mean, std = mean_std_tensors(data.mean, data.std, rt.device)
    augment = torch.Generator(device=rt.device).manual_seed(1)
    batches = data.train_batches(cfg.batch_size, torch.Generator().manual_seed(0))
    steps = data.steps_per_epoch(cfg.batch_size)

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        set_lr(optimizer, lr_at(i, total_steps=steps, warmup_steps=2, peak=0.1, floor=0.0))
        inputs = train_transform(x, pad=1, flip=False, jitter=0.2, mean=mean, std=std,
                                 generator=augment)
        runner.step(inputs.contiguous(memory_format=torch.channels_last), y, epoch=1, step=i)

    # The first step sets up cuDNN, cuBLAS and the optimizer's state, and the first batch
    # uploads the epoch's shuffled order: once per run or epoch, not per step.
    step(0, *next(batches))
    assert _syncs(lambda: [step(i, x, y) for i, (x, y) in enumerate(batches, start=1)]) == 0
    runner.check_finite()  # the one read the loop makes every 16 steps


def test_bf16_training_steps_never_wait_for_the_device() -> None:
    _steps_without_sync("bf16")


def test_fp16_steps_with_loss_scaling_never_wait_for_the_device() -> None:
    # Unfused, GradScaler.step reads its inf check on the host each step; the fused optimizer
    # takes it on the device.
    _steps_without_sync("fp16")


def test_evaluation_reads_the_device_once_per_split_not_per_batch() -> None:
    rt = resolve_runtime("cuda", "auto")
    data = load_data(DIGITS, rt.device)
    model = build_model(DIGITS, data.num_classes, data.in_channels).to(rt.device)
    model = model.to(memory_format=torch.channels_last)
    mean, std = mean_std_tensors(data.mean, data.std, rt.device)
    evaluate(model, data, "test", rt, batch_size=16, mean=mean, std=std, confusion=True)  # warm
    batches = -(-data.n_test // 16)
    assert batches > 10
    count = _syncs(lambda: evaluate(model, data, "test", rt, batch_size=16, mean=mean, std=std,
                                    confusion=True))
    assert count <= 2, count  # the totals, and the confusion matrix


# --- without pytest -------------------------------------------------------------------------


def _run_without_pytest() -> int:
    """Every test_ function of this module in order, `tmp_path` a fresh folder; 1 on a failure."""
    if not CUDA:
        print(f"SKIPPED all: {SKIP_REASON}")
        return 0
    tests = [(name, fn) for name, fn in list(globals().items())
             if name.startswith("test_") and callable(fn)]
    failed = []
    for name, fn in tests:
        kwargs = {}
        if "tmp_path" in inspect.signature(fn).parameters:
            kwargs["tmp_path"] = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        started = time.perf_counter()
        try:
            fn(**kwargs)
            print(f"PASSED {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        except Exception:
            failed.append(name)
            print(f"FAILED {name} ({time.perf_counter() - started:.1f} s)", flush=True)
            traceback.print_exc()
    print(f"{len(tests) - len(failed)} passed, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_without_pytest())
