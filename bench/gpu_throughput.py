"""GPU training throughput: `trainer.train` eager and compiled, and 1 to 8 workers sharing one GPU
by slots, against a plain PyTorch loop with a DataLoader, on the same model and synthetic images.

    PYTHONPATH=. python bench/gpu_throughput.py              # a CUDA GPU: about 4-5 minutes
    PYTHONPATH=. python bench/gpu_throughput.py --cpu-smoke  # anywhere: tiny sizes, on the CPU

What it answers: on a GPU, how many images/s does our loop (uint8 images kept on the GPU,
augmentation batched there, channels_last, bf16, no host sync per step) train, against the loop
most PyTorch code is written as; what does `compile = true` add, and what share of the GPU's
bf16 matrix-multiply peak do they reach; how much memory; and how does the total throughput of
N worker processes on one GPU (`cuda:free:N`, each capped at 1/N of its memory) grow with N?

Per model (resnet20 at 32x32, batch 512; resnet50 at 224x224 with its ImageNet stem, batch 128),
three rows, measured in this run:
  baseline  a plain loop: a Dataset of uint8 images with per-image RandomCrop and flip in
            DataLoader workers (pinned memory), the same model in NCHW, the same autocast dtype,
            SGD, `loss.item()` logged every step, as tutorials write it
  ours      `trainer.train`, amp=auto, eager
  ours      the same with compile=true (inductor); its compile time printed apart
Columns: images/s (steady state: the trainer's own per-epoch figure after a warm-up epoch, which
leaves out evaluation and compilation; the baseline timed over steps after warm-up steps, with
a device sync at both ends), the ratio to the baseline, model TFLOP/s (3x the forward FLOPs that
FlopCounterMode counts per image), that as a share of the bf16 peak of a large `torch.mm`
measured at the start, peak memory (the allocator's peak, reset before each row; on the CPU the
process's maximum RSS, which never resets) and compile seconds.

Then ours eager resnet20 in 1, 2, 4 and 8 worker processes on one GPU: each process claims a slot
with `cuda:free:N` (trainer/device.py: lock files in a temporary folder, the memory cap), trains
a warm-up epoch, waits until all are ready, then trains for --window seconds; the row gives the
sum of their images/s (their evaluations included, as in a worker's trial), per worker, and the
ratio to one worker.

Needs torch, torchvision, numpy and scikit-learn (what trainer/ imports) and the source tree on
PYTHONPATH; never search/ or optuna, so it runs on a GPU machine that has only PyTorch.
`--cpu-smoke` (automatic without a GPU) runs the same logic at tiny sizes on the CPU, with
Dynamo's `eager` backend instead of inductor (whose C++ build takes minutes on a small CPU),
and 1 and 2 workers: its figures say nothing about a GPU; tests/trainer/test_bench_gpu.py
runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import child_env  # bench/, the script's folder, is on the path
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's trainer/, whatever a virtualenv has installed

from trainer import compiled, datasets  # noqa: E402  (after the path: run as a script)
from trainer import data as trainer_data  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.device import autocast, claim_device, peak_memory_mb, resolve_runtime  # noqa: E402
from trainer.errors import Interrupted  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.train import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    model: str
    image_size: int
    batch_size: int
    images: int  # synthetic images generated (train is ~90% of them)
    small_stem: bool
    width: float = 1.0


GPU_CASES = (
    Case("resnet20 32x32", "resnet20", 32, 512, 16384, small_stem=True),
    Case("resnet50 224x224", "resnet50", 224, 128, 2048, small_stem=False),
)
SMOKE_CASES = (
    Case("resnet20 16x16", "resnet20", 16, 32, 512, small_stem=True, width=0.25),
    Case("resnet50 32x32", "resnet50", 32, 16, 128, small_stem=False),
)
# Few held-out images: an epoch is mostly training, so epoch boundaries (evaluation, the sync
# that ends an epoch) come seldom.
HELD_OUT = 0.05


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to run: the GPU's sizes or the smoke run's."""

    device: str
    cases: tuple[Case, ...]
    measured_epochs: int
    baseline_warmup: int
    baseline_steps: int
    workers: tuple[int, ...]
    window: float
    peak_size: int
    backend: str
    loader_workers: int


def make_plan(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan("cpu", SMOKE_CASES, 1, 2, 4, tuple(args.workers or (1, 2)), args.window or 1.0,
                    512, "eager", 2)
    return Plan("cuda", GPU_CASES, 3, 10, 40, tuple(args.workers or (1, 2, 4, 8)),
                args.window or 8.0, 8192, compiled.BACKEND, min(8, os.cpu_count() or 1))


def config(case: Case, device: str, **fields: Any) -> TrainConfig:
    return TrainConfig(
        dataset="synthetic", image_size=case.image_size, model=case.model, width=case.width,
        small_stem=case.small_stem, batch_size=case.batch_size, optimizer="nesterov", lr=0.05,
        val_fraction=HELD_OUT, test_fraction=HELD_OUT, device=device, amp="auto", **fields,
    )  # fmt: skip


def use_case(case: Case) -> None:
    """Generate `case.images` synthetic images: the trainer's set has 2,048, a few steps of
    batch 512. Its generator reads the count when it runs, so setting it here is enough."""
    trainer_data.clear_cache()
    datasets.SYNTHETIC_COUNT = case.images


# --- the machine ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peak(device: torch.device, size: int, samples: int = 10, per_sample: int = 5) -> float:
    """bf16 FLOP/s of a square `torch.mm`, best of `samples` timings of `per_sample` products."""
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    b = torch.randn(size, size, device=device).to(torch.bfloat16)
    out = torch.mm(a, b)  # first call: library set-up, not timed
    best = math.inf
    for _ in range(samples):
        sync(device)
        started = time.perf_counter()
        for _ in range(per_sample):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - started) / per_sample)
    return 2 * size**3 / best


def train_flops(cfg: TrainConfig, classes: int, channels: int) -> float:
    """Training FLOPs per image: 3x the forward's (backward ~ 2x forward), as FlopCounterMode
    counts convolutions and linear layers (2 per multiply-add), on the CPU."""
    model = build_model(cfg, classes, channels).eval()
    x = torch.zeros(2, channels, cfg.image_size, cfg.image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return 3 * counter.get_total_flops() / len(x)


# --- ours ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    images_per_sec: float
    peak_mb: float
    compile_seconds: float | None = None


def run_ours(cfg: TrainConfig, name: str, measured: int) -> Row:
    """`trainer.train` for a warm-up epoch and `measured` more; images/s over the measured ones
    (the trainer's own per-epoch figure: evaluation and compilation left out)."""
    device = resolve_runtime(cfg.device, cfg.amp).device
    reset_peak(device)
    result = train(dataclasses.replace(cfg, epochs=1 + measured))
    epochs = result.history[1:]
    images = sum(h["images_per_sec"] * h["epoch_seconds"] for h in epochs)
    seconds = sum(h["epoch_seconds"] for h in epochs)
    return Row(name, images / seconds, result.peak_memory_mb,
               result.compile_seconds if cfg.compile else None)


# --- the baseline --------------------------------------------------------------------------------


class CropFlipImages(Dataset):
    """uint8 CHW images, each randomly cropped (zero padding of size/8) and flipped when taken,
    then float and normalised: per-image work in the DataLoader's workers, as tutorials do."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor) -> None:
        from torchvision import transforms

        size = images.shape[-1]
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.augment = transforms.Compose([
            transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip(),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.augment(self.images[index]).float().div_(255)
        return x.sub_(self.mean).div_(self.std), self.labels[index]


def run_baseline(cfg: TrainConfig, plan: Plan, name: str) -> Row:
    rt = resolve_runtime(cfg.device, cfg.amp)
    data = trainer_data.load_data(cfg, rt.device)
    batches = list(data.eval_batches("train", 1024))
    images = torch.cat([x for x, _ in batches]).cpu()
    labels = torch.cat([y for _, y in batches]).cpu()
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    cuda = rt.device.type == "cuda"
    loader = DataLoader(
        CropFlipImages(images, labels, mean, std), batch_size=cfg.batch_size, shuffle=True,
        num_workers=plan.loader_workers, pin_memory=cuda, drop_last=True,
        persistent_workers=plan.loader_workers > 0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, data.num_classes, data.in_channels).to(rt.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    reset_peak(rt.device)
    model.train()
    running, step, started = 0.0, 0, 0.0
    total = plan.baseline_warmup + plan.baseline_steps
    while step < total:
        for x, y in loader:
            x = x.to(rt.device, non_blocking=cuda)
            y = y.to(rt.device, non_blocking=cuda)
            with autocast(rt):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.item()  # what such loops log; a host sync per step on a GPU
            step += 1
            if step == plan.baseline_warmup:
                sync(rt.device)
                started = time.perf_counter()
            if step == total:
                break
    sync(rt.device)
    seconds = time.perf_counter() - started
    return Row(name, plan.baseline_steps * cfg.batch_size / seconds, peak_memory_mb(rt.device))


# --- workers sharing a GPU -----------------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> int:
    """One of N workers on one GPU: claim a slot, warm up, say so, wait for "go", train for the
    window and print what it trained."""
    case = Case(**json.loads(args.case))
    use_case(case)
    slot_name = f"cuda:free:{args.slots}"
    if args.cpu_smoke:  # no GPU: the same claim on one pretend GPU, no memory cap to set
        _, lock = claim_device(slot_name, args.lock_dir, gpus=1, limit=lambda f, g: None)
        device = "cpu"
    else:
        device, lock = claim_device(slot_name, args.lock_dir)
    assert lock is not None
    cfg = config(case, device, epochs=10_000)
    rt = resolve_runtime(cfg.device, cfg.amp)
    stop = threading.Event()
    clock: dict[str, float] = {"steps": 0}

    def progress(epoch: int, step: int, steps: int) -> None:
        if "t0" in clock:
            clock["steps"] += 1
            if time.perf_counter() - clock["t0"] >= args.window:
                stop.set()  # the loop runs one more step, then raises Interrupted
        elif epoch == 2:  # a warm-up epoch done
            print(json.dumps({"ready": device}), flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(1)
            sync(rt.device)
            clock["t0"] = time.perf_counter()

    with contextlib.suppress(Interrupted):  # the end of the window
        train(cfg, progress=progress, stop=stop)
    sync(rt.device)
    seconds = time.perf_counter() - clock["t0"]
    fraction = (torch.cuda.get_per_process_memory_fraction(rt.device)
                if rt.device.type == "cuda" and hasattr(torch.cuda,
                                                        "get_per_process_memory_fraction")
                else 1.0 / args.slots)
    print(json.dumps({"images": (clock["steps"] + 1) * case.batch_size, "seconds": seconds,
                      "peak_mb": peak_memory_mb(rt.device), "device": device,
                      "fraction": fraction}), flush=True)
    return 0


@dataclasses.dataclass
class WorkersRow:
    workers: int
    total: float
    per_worker: list[float]
    peak_mb: list[float]
    fraction: float


def run_workers(case: Case, n: int, plan: Plan, smoke: bool, window: float) -> WorkersRow:
    # One GPU for all of them: the first this process may use.
    env = child_env(PYTHONPATH=str(ROOT))
    if not smoke:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    with tempfile.TemporaryDirectory(prefix="gpu-slots-") as locks:
        cmd = [sys.executable, __file__, "--role", "worker", "--slots", str(n), "--lock-dir",
               locks, "--window", str(window), "--case", json.dumps(dataclasses.asdict(case))]
        if smoke:
            cmd.append("--cpu-smoke")
        procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        try:
            for p in procs:
                _answer(p)  # ready
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            results = [_answer(p) for p in procs]
        finally:
            for p in procs:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(timeout=120)
    rates = [r["images"] / r["seconds"] for r in results]
    return WorkersRow(n, sum(rates), rates, [r["peak_mb"] for r in results],
                      results[0]["fraction"])


def _answer(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker process exited {p.wait()} before answering")
    return dict(json.loads(line))


# --- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU (the default where there is no CUDA device)")
    p.add_argument("--workers", type=lambda s: [int(n) for n in s.split(",")],
                   help="worker counts on one GPU, e.g. 1,2,4,8 (smoke: 1,2); 0 to skip")
    p.add_argument("--window", type=float, default=0.0,
                   help="seconds each worker count trains for (default 8; smoke 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the compiled rows (their compilation is most of the run)")
    # The worker processes' own flags.
    p.add_argument("--role", choices=("main", "worker"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--slots", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--lock-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        args.cpu_smoke = True
    if args.workers == [0]:
        args.workers = []
    elif args.workers is not None and any(n < 1 for n in args.workers):
        p.error("--workers: counts must be at least 1 (or 0 alone, to skip)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "worker":
        return worker_main(args)
    plan = make_plan(args)
    compiled.BACKEND = plan.backend
    if args.cpu_smoke:
        # One thread, as the worker processes have: OpenMP threads on shared, busy cores can
        # run many times slower than one.
        torch.set_num_threads(1)
    began = time.perf_counter()
    device = torch.device(plan.device)
    rt = resolve_runtime(plan.device, "auto")
    amp = str(rt.amp_dtype).removeprefix("torch.") if rt.amp_dtype else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} thread(s) on {os.cpu_count()} cores)")
    print(f"gpu throughput, {datetime.date.today()}: {name}, torch {torch.__version__},"
          f" amp=auto is {amp} here, compile backend {plan.backend}")
    if args.cpu_smoke:
        print("CPU SMOKE RUN: tiny models on the CPU, Dynamo's eager backend; these figures"
              " check the benchmark's logic and say nothing about a GPU")
    peak = matmul_peak(device, plan.peak_size)
    print(f"bf16 matrix-multiply peak, torch.mm {plan.peak_size}x{plan.peak_size}:"
          f" {peak / 1e12:.2f} TFLOP/s", flush=True)

    summary: list[str] = []
    for case in plan.cases:
        use_case(case)
        cfg = config(case, plan.device)
        data = trainer_data.load_data(cfg, rt.device)
        steps = data.steps_per_epoch(case.batch_size)
        flops = train_flops(cfg, data.num_classes, data.in_channels)
        print()
        print(f"{case.label}, batch {case.batch_size}: {data.n_train} synthetic training images"
              f" ({steps} steps/epoch), {flops / 3e9:.3g} GFLOP forward per image", flush=True)
        rows = [run_baseline(cfg, plan, f"baseline  DataLoader, {plan.loader_workers} workers")]
        rows.append(run_ours(cfg, "ours      trainer.train eager", plan.measured_epochs))
        if args.compile:
            compiled.clear_cache()
            rows.append(run_ours(dataclasses.replace(cfg, compile=True),
                                 "ours      trainer.train compiled", plan.measured_epochs))
        print(f"{'variant':<34} {'img/s':>9} {'vs base':>8} {'TFLOP/s':>8} {'of peak':>8}"
              f" {'peak MB':>9} {'compile s':>10}")
        for row in rows:
            achieved = row.images_per_sec * flops
            compile_s = f"{row.compile_seconds:.1f}" if row.compile_seconds is not None else "-"
            print(f"{row.name:<34} {row.images_per_sec:>9.1f}"
                  f" {row.images_per_sec / rows[0].images_per_sec:>7.2f}x"
                  f" {achieved / 1e12:>8.3f} {achieved / peak:>8.1%} {row.peak_mb:>9.0f}"
                  f" {compile_s:>10}", flush=True)
        ratios = ", ".join(f"{r.name.split()[-1]} {r.images_per_sec / rows[0].images_per_sec:.2f}x"
                           for r in rows[1:])
        summary.append(f"{case.label}: {ratios} the baseline")

    if plan.workers:
        case = plan.cases[0]
        print()
        print(f"workers on one {'CPU' if args.cpu_smoke else 'GPU'}: ours eager {case.label},"
              f" batch {case.batch_size}, each cuda:free:N, {plan.window:.0f} s window"
              " (evaluations included)")
        print(f"{'workers':>7} {'total img/s':>12} {'per worker':>11} {'vs 1 worker':>12}"
              f" {'memory cap':>11} {'peak MB/worker':>15}")
        first: float | None = None
        for n in plan.workers:
            row = run_workers(case, n, plan, args.cpu_smoke, plan.window)
            first = first or row.total / n  # one worker's rate, whichever count came first
            print(f"{n:>7} {row.total:>12.1f} {row.total / n:>11.1f} {row.total / first:>11.2f}x"
                  f" {row.fraction:>11.3f} {max(row.peak_mb):>15.0f}", flush=True)
            summary.append(f"{n} worker(s) {row.total / first:.2f}x one")
    print()
    print(f"summary ({'cpu smoke' if args.cpu_smoke else name}): " + "; ".join(summary)
          + f"; {time.perf_counter() - began:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
