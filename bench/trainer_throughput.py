"""Training throughput of `trainer.train` against a plain PyTorch loop, on the same model and data.

What it answers: does our loop (uint8 images kept on the device, augmentation batched on the
device, one `index_select` per batch) train faster than the loop most PyTorch code is written as
(a torchvision-style Dataset of PIL images, per-image transforms in DataLoader workers)? And how
much of the machine's matrix-multiply rate does our loop turn into model FLOP/s?

    .venv/bin/python bench/trainer_throughput.py            # or: make bench
    .venv/bin/python bench/trainer_throughput.py --data-root data --repeats 9 --threads 1

One run measures, on the same model, batch size and 32x32x3 ten-class images (the trainer's
`synthetic` set, or CIFAR-10 when --data-root holds it): `trainer.train` at amp="off", at
amp="auto" (and at --amp-extra, bf16 by default), and the reference loop at fp32. Figures are
steady-state: warm-up steps and epoch boundaries are left out. Each variant runs --repeats
rounds of a few steps, in an order that rotates every round, so a burst of load from other
processes falls on every variant alike; the table gives images/s at the median step of all
rounds and of the fastest round. Where amp="auto" is fp32 (a CPU without native bf16), its two
rows are one computation timed twice and their ratio is the run's noise, against which the
verdict is made; where it is bf16, the noise floor alone is used.
The machines this runs on are often shared: two OpenMP threads on two busy cores can be several
times slower than one, so read the load average printed with the figures, trust ratios more
than absolute numbers, and rerun with more --repeats when the noise is wide. With the defaults,
about a minute and a half on an idle 2-core machine, several times that on a busy one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from trainer.config import TrainConfig
from trainer.data import ImageData, load_data
from trainer.device import resolve_runtime
from trainer.errors import Interrupted
from trainer.models import build_model
from trainer.train import train

CIFAR10_FOLDER = "cifar-10-batches-py"  # torchvision's layout under the data root
PEAK_SIZE = 2048  # square matrices for the matrix-multiply peak: large enough to be compute bound
PEAK_REPS_PER_ROUND = 2
# Least noise assumed for a ratio: on the shared 2-core machine, amp=off and amp=auto (one
# computation on the CPU) timed 0.95x..1.01x of each other in four quiet runs of 10-12 rounds.
NOISE_FLOOR = 0.03


@dataclasses.dataclass
class StepClock:
    """Durations of steady-state training steps, from a timestamp taken as each step ends.

    A step's duration is the time since the previous step ended, so it covers everything the loop
    does per step: fetching the batch, augmenting it, forward, backward, optimizer. Left out: the
    first `warmup` steps (one-off allocations, oneDNN primitive creation, worker start-up) and the
    first step of every epoch, which for ours would include the previous epoch's evaluation and
    for the reference its DataLoader shutting down and forking new workers. Neither is training,
    and leaving both out favours the reference, whose workers restart every epoch.
    """

    warmup: int
    steps: int
    durations: list[float] = dataclasses.field(default_factory=list)
    seen: int = 0
    last: float | None = None

    def tick(self, first_of_epoch: bool) -> None:
        now = time.perf_counter()
        self.seen += 1
        if self.last is not None and self.seen > self.warmup and not first_of_epoch:
            self.durations.append(now - self.last)
        self.last = now

    @property
    def remaining(self) -> int:
        return self.steps - len(self.durations)


# --- ours ----------------------------------------------------------------------------------------


def time_ours(cfg: TrainConfig, steps_per_epoch: int, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steady-state steps of `trainer.train(cfg)`.

    Timed with the progress callback rather than the per-epoch `images_per_sec` the trainer
    reports: the synthetic set has only 10 steps per epoch and a step of resnet20 at batch 128
    takes 0.3 s on two idle cores (seconds on busy ones), so whole epochs, the first skipped as
    warm-up, would leave time for two or three samples per variant, not rounds of each. Per-step
    stamps time exactly what the trainer's figure times (the epoch's training loop, evaluation
    excluded) and time the reference loop the same way. The run is ended through `stop`, which
    raises `Interrupted` right after the step that follows it being set; that step is the last
    one measured.
    """
    clock = StepClock(warmup, steps)
    stop = threading.Event()

    def progress(epoch: int, step: int, per_epoch: int) -> None:
        clock.tick(first_of_epoch=step == 1)
        # Stop once the next step is the last one needed, unless it opens an epoch (not counted).
        if clock.remaining <= 1 and clock.seen >= warmup and step < per_epoch:
            stop.set()

    # Enough epochs that the run cannot end before the clock is full; we stop it well before.
    epochs = math.ceil((warmup + steps + 1) / max(1, steps_per_epoch - 1)) + 1
    try:
        train(dataclasses.replace(cfg, epochs=epochs), progress=progress, stop=stop)
    except Interrupted:
        clock.tick(first_of_epoch=False)
    return clock.durations


# --- the reference loop --------------------------------------------------------------------------


class PilImages(Dataset):
    """A torchvision-style dataset: PIL images and int labels, transformed per item.

    The images become PIL once, here, as the brief for this benchmark asks; torchvision's CIFAR10
    keeps a uint8 array and calls `Image.fromarray` in every `__getitem__`, which is slightly more
    work per image, so this reference is if anything a little faster than the real thing.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable) -> None:
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.images = [Image.fromarray(a) for a in hwc]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


@dataclasses.dataclass
class Reference:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader


def make_reference(cfg: TrainConfig, data: ImageData, workers: int) -> Reference:
    """The loop as a tutorial writes it, fed with the same training images as ours."""
    batches = list(data.eval_batches("train", 1024))
    images = torch.cat([x for x, _ in batches]).cpu()
    labels = torch.cat([y for _, y in batches]).cpu()
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std),
    ])  # fmt: skip
    loader = DataLoader(
        PilImages(images, labels, transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.num_classes, data.in_channels)
    # SGD with Nesterov momentum as the trainer makes it (cfg.optimizer = "nesterov"), but over
    # one parameter group with decay on everything, as such code does.
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=cfg.momentum, nesterov=True,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    return Reference(model, optimizer, loader)


def time_reference(ref: Reference, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steady-state steps of the plain loop (fp32, `model.train()`)."""
    clock = StepClock(warmup, steps)
    ref.model.train()
    running_loss = 0.0
    while clock.remaining > 0:
        for i, (x, y) in enumerate(ref.loader):
            loss = F.cross_entropy(ref.model(x), y)
            ref.optimizer.zero_grad()
            loss.backward()
            ref.optimizer.step()
            running_loss += loss.item()  # what such loops log; free of syncs on the CPU
            clock.tick(first_of_epoch=i == 0)
            if clock.remaining <= 0:
                break  # drops the iterator: its workers exit, as at the end of an epoch
    return clock.durations


# --- the machine ---------------------------------------------------------------------------------


def forward_flops(cfg: TrainConfig, data: ImageData) -> float:
    """FLOPs of one image's forward pass: convolutions and the linear head, as FlopCounterMode
    counts them (2 per multiply-add; BatchNorm, ReLU and pooling are not counted)."""
    model = build_model(cfg, data.num_classes, data.in_channels).eval()
    x = torch.zeros(8, data.in_channels, data.image_size, data.image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / len(x)


class MatmulPeak:
    """FLOP/s of a large square `torch.mm` on the current threads, best of all samples: load from
    other processes only ever makes a sample slower. Sampled a little in every round, so that a
    quiet moment anywhere in the run can show the machine's real peak."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.a = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)
        self.b = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)
        self.best_seconds = math.inf
        torch.mm(self.a, self.b)  # first call: oneDNN/MKL set-up, not timed

    def sample(self, reps: int) -> None:
        for _ in range(reps):
            started = time.perf_counter()
            torch.mm(self.a, self.b)
            self.best_seconds = min(self.best_seconds, time.perf_counter() - started)

    @property
    def flops(self) -> float:
        return 2 * PEAK_SIZE**3 / self.best_seconds


# --- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One loop at one precision, and what its rounds measured."""

    name: str
    precision: str
    peak_dtype: torch.dtype
    run: Callable[[], list[float]]  # one round: the durations of its timed steps
    batch_size: int
    steps: list[float] = dataclasses.field(default_factory=list)  # every timed step, all rounds
    rounds: list[float] = dataclasses.field(default_factory=list)  # images/s of each round

    def measure(self) -> None:
        durations = self.run()
        self.steps += durations
        self.rounds.append(self.batch_size * len(durations) / sum(durations))

    @property
    def median(self) -> float:
        """Images/s at the median step of all rounds: a step slowed by a burst of load from
        another process moves the median far less than it moves a mean."""
        return self.batch_size / statistics.median(self.steps)

    @property
    def best(self) -> float:
        """Images/s of the fastest round: the closest this run came to an idle machine. A round
        rather than a step, so the reference's worker work between steps is always included."""
        return max(self.rounds)

    @property
    def label(self) -> str:
        """Short name for the per-round lines: "ours amp=off", "reference"."""
        words = self.name.split()
        return f"{words[0]} {words[2]}" if words[0] == "ours" else words[0]


def amp_label(amp: str) -> str:
    """What `amp` resolves to on the CPU, as the trainer decides it."""
    dtype = resolve_runtime("cpu", amp).amp_dtype
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", help="any TrainConfig model (default resnet20)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (default 1.0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per round (default 1; at least 1: the first step of a"
                   " round has no earlier step to be timed from)")
    p.add_argument("--repeats", type=int, default=10, help="rounds of every variant (default 10)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch intra-op threads (default {torch.get_num_threads()}, torch's)")
    p.add_argument("--data-root", default="",
                   help=f"folder holding {CIFAR10_FOLDER}/; without it, the synthetic set")
    # fp16 is left out: CPUs have no fp16 matrix units, and torch emulates it at ~0.4 GFLOP/s.
    p.add_argument("--amp-extra", choices=("bf16", "none"), default="bf16",
                   help="one more precision for ours (default bf16; none to skip)")
    p.add_argument("--ref-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the reference: min(4, cpu count) as tutorials do")
    args = p.parse_args(argv)
    if args.data_root and not os.path.isdir(os.path.join(args.data_root, CIFAR10_FOLDER)):
        p.error(f"--data-root {args.data_root!r} has no {CIFAR10_FOLDER}/ (torchvision's"
                " CIFAR-10 layout); put it there, or leave --data-root out for synthetic data")
    for name in ("steps", "warmup", "repeats", "threads", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ref_workers < 0:
        p.error("--ref-workers must be 0 (load in the training process) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cfg = TrainConfig(
        dataset="cifar10" if args.data_root else "synthetic",
        data_root=args.data_root or "data",
        model=args.model,
        width=args.width,
        batch_size=args.batch_size,
        optimizer="nesterov",
        device="cpu",
        amp="off",
    )
    data = load_data(cfg, torch.device("cpu"))  # cached: every train() below reuses it
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch < 2:
        print(f"error: {data.n_train} training images make {steps_per_epoch} step(s) of"
              f" {cfg.batch_size} per epoch; the first step of an epoch is not timed, so lower"
              " --batch-size", file=sys.stderr)
        return 2
    ref = make_reference(cfg, data, args.ref_workers)

    def ours(amp: str) -> Callable[[], list[float]]:
        run_cfg = dataclasses.replace(cfg, amp=amp)
        return lambda: time_ours(run_cfg, steps_per_epoch, args.warmup, args.steps)

    batch = cfg.batch_size
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    auto = amp_label("auto")
    variants = [
        Variant("ours      trainer.train amp=off", "fp32", torch.float32, ours("off"), batch),
        Variant("ours      trainer.train amp=auto", f"{auto} (auto)", dtypes[auto], ours("auto"),
                batch),
        Variant(f"reference DataLoader, {args.ref_workers} workers", "fp32", torch.float32,
                lambda: time_reference(ref, args.warmup, args.steps), batch),
    ]
    if args.amp_extra != "none":
        variants.append(Variant(f"ours      trainer.train amp={args.amp_extra}", args.amp_extra,
                                dtypes[args.amp_extra], ours(args.amp_extra), batch))

    peaks = {dtype: MatmulPeak(dtype) for dtype in dict.fromkeys(v.peak_dtype for v in variants)}
    flops_fwd = forward_flops(cfg, data)
    flops_train = 3 * flops_fwd  # backward ~ 2x forward: gradients of activations and of weights

    source = f"CIFAR-10 from {args.data_root}" if args.data_root else "synthetic"
    print(f"trainer throughput, {datetime.date.today()}: {cfg.model} width {cfg.width},"
          f" batch {cfg.batch_size}, {source} {data.image_size}x{data.image_size}x"
          f"{data.in_channels} ({data.n_train} train images, {steps_per_epoch} steps/epoch)")
    print(f"cpu, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores, torch"
          f" {torch.__version__}; amp=auto resolves to {auto} here; load average {load_before:.1f}")
    print(f"per variant: {args.repeats} rounds x {args.steps} timed steps ({args.warmup} untimed"
          " warm-up step(s) per round), rounds in rotating order", flush=True)

    for r in range(args.repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.measure()
        for peak in peaks.values():
            peak.sample(PEAK_REPS_PER_ROUND)
        print(f"  round {r + 1}/{args.repeats} img/s: "
              + ", ".join(f"{v.label} {v.rounds[-1]:.1f}" for v in variants), flush=True)
    load_after = os.getloadavg()[0]

    ours_fp32, ours_auto, reference = variants[0], variants[1], variants[2]
    print()
    print(f"{'variant':<36} {'precision':<11} {'median':>7} {'best':>7} {'vs ref':>7}"
          f" {'(best)':>7} {'GFLOP/s':>8} {'of mm peak':>10}")
    for v in variants:
        achieved = v.median * flops_train
        print(f"{v.name:<36} {v.precision:<11} {v.median:>7.1f} {v.best:>7.1f}"
              f" {v.median / reference.median:>6.2f}x {v.best / reference.best:>6.2f}x"
              f" {achieved / 1e9:>8.2f} {achieved / peaks[v.peak_dtype].flops:>10.1%}")
    print("(median: img/s at the median step of all rounds; best: img/s of the fastest round;"
          " vs ref: median over median, best over best; GFLOP/s and of mm peak: at the median)")
    print()
    print(f"model: {flops_fwd / 1e6:.1f} MFLOP forward per image (FlopCounterMode: convolutions"
          f" and linear layers); training counted as 3x forward = {flops_train / 1e6:.1f}"
          " MFLOP/image")
    print(f"matrix-multiply peak, torch.mm {PEAK_SIZE}x{PEAK_SIZE}, best of"
          f" {PEAK_REPS_PER_ROUND * args.repeats} samples: "
          + ", ".join(f"{str(d).removeprefix('torch.')} {p.flops / 1e9:.1f} GFLOP/s"
                      for d, p in peaks.items()))
    ratio_ref = ours_fp32.median / reference.median
    ratio_best = ours_fp32.best / reference.best
    ratio_amp = ours_auto.median / ours_fp32.median
    same = " (the same computation here, so this ratio shows the noise)" if auto == "fp32" else ""
    print(f"ours/reference at fp32: {ratio_ref:.2f}x median, {ratio_best:.2f}x best round")
    print(f"ours amp=auto ({auto})/ours fp32: {ratio_amp:.2f}x{same}")
    extra = ""
    if args.amp_extra != "none":
        ratio_extra = variants[3].median / ours_fp32.median
        print(f"ours amp={args.amp_extra}/ours fp32: {ratio_extra:.2f}x")
        extra = f", amp={args.amp_extra} {ratio_extra:.2f}x"
    # The 1-minute load average before the run is other processes' doing; the one after it
    # includes this benchmark (its threads and the reference's workers).
    cores = os.cpu_count() or 1
    busy = ": other processes were competing for the cores" if load_before > cores else ""
    print(f"load average {load_before:.1f} before the run (on {cores} cores){busy};"
          f" {load_after:.1f} after, this benchmark included")
    # amp=auto resolving to fp32 makes two runs of one computation: how far their ratio is from 1
    # is this run's noise, and a difference smaller than that is not a difference.
    noise = max(NOISE_FLOOR, abs(ratio_amp - 1) if auto == "fp32" else 0.0)
    if ratio_ref > 1 + noise:
        verdict = "ahead of the reference"
    elif ratio_ref < 1 - noise:
        verdict = "NOT ahead of the reference"
    else:
        verdict = f"within this run's noise of {noise:.0%} (rerun with more --repeats)"
    print(f"summary: {cfg.model} b{cfg.batch_size} cpu x{torch.get_num_threads()}: ours"
          f" {ours_fp32.median:.1f} img/s vs reference {reference.median:.1f} img/s at fp32 ="
          f" {ratio_ref:.2f}x ({ratio_best:.2f}x best round), {verdict};"
          f" amp=auto ({auto}) {ratio_amp:.2f}x fp32{extra}; ours at"
          f" {ours_fp32.median * flops_train / peaks[torch.float32].flops:.1%} of fp32 mm peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
