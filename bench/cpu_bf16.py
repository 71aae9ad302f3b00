"""bf16 autocast against fp32 on the CPU: does bf16 lose accuracy, and how much faster is it?

What it answers: may `amp = "auto"` resolve to bf16 on a CPU with native bf16 instructions
(`avx512_bf16` or AMX)? Only if several seeds of the same training, fp32 and bf16, end at the
same accuracy; and it is only worth it if bf16 is faster. The baseline is fp32 (`amp="off"`),
measured in the same run: each seed trains fp32 then bf16 (order alternating by seed, so a burst
of load from other processes falls on both alike), on scikit-learn's digits with the demo
space's fixed model (resnet20, width 1, crop_pad 1, no flips).

    .venv/bin/python bench/cpu_bf16.py                      # 5 seeds x 15 epochs + 8 speed rounds
    .venv/bin/python bench/cpu_bf16.py --seeds 3 --epochs 8 --threads 1

Printed per seed and as mean ± sample std over the seeds: the last epoch's val_acc, the best
epoch's val_acc and that epoch's test_acc, and images/s (the trainer's own figure, evaluation
excluded). The accuracy verdict compares the mean difference in final val_acc with its spread
across seeds: bf16 "loses accuracy" only if the fp32-minus-bf16 difference is larger than two
standard errors of the paired differences and larger than one validation image.

Speed is measured apart, in --speed-rounds short rounds: each trains fp32 and bf16 for two
epochs (order alternating) and takes the second epoch's images/s, so the two of a round run
seconds apart; the ratio is the median of the rounds' ratios, which a burst of load from other
processes on a shared machine moves less than it moves whole runs minutes apart.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import torch

from trainer.config import TrainConfig
from trainer.device import cpu_has_native_bf16, resolve_runtime
from trainer.train import train


@dataclass
class Runs:
    """One precision's results, one entry per seed."""

    amp: str
    final_val: list[float] = field(default_factory=list)
    best_val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    images_per_sec: list[float] = field(default_factory=list)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def speed_rounds(base: TrainConfig, rounds: int) -> list[float]:
    """bf16/fp32 images/s of each round: the second of two epochs of each, back to back."""
    ratios = []
    for r in range(rounds):
        rate = {}
        for amp in ("off", "bf16") if r % 2 == 0 else ("bf16", "off"):
            result = train(TrainConfig(**{**base.to_dict(), "epochs": 2, "amp": amp}))
            rate[amp] = result.history[-1]["images_per_sec"]
        ratios.append(rate["bf16"] / rate["off"])
        print(f"  speed round {r + 1}/{rounds}: bf16/fp32 {ratios[-1]:.2f}x", flush=True)
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="training seeds (default 5; at least 2)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run (default 15)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--speed-rounds", type=int, default=8,
                   help="short fp32/bf16 pairs timed for the speed ratio (default 8)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch intra-op threads (default {torch.get_num_threads()})")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2: a spread needs two runs")
    if args.epochs < 1 or args.threads < 1 or args.speed_rounds < 0:
        p.error("--epochs and --threads must be at least 1, --speed-rounds at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = TrainConfig(
        dataset="digits", model="resnet20", width=args.width, crop_pad=1, hflip=False,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device="cpu",
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    auto = resolve_runtime("cpu", "auto").amp_dtype
    print(f"cpu bf16 against fp32, {datetime.date.today()}: {base.model} width {base.width},"
          f" digits, {base.epochs} epochs, batch {base.batch_size}, lr {base.lr},"
          f" {args.seeds} seeds")
    print(f"cpu {torch.cpu.get_capabilities().get('cpu_name', '?')}, native bf16:"
          f" {cpu_has_native_bf16()}, {torch.get_num_threads()} torch threads on"
          f" {os.cpu_count()} cores, torch {torch.__version__}; amp=auto resolves to"
          f" {str(auto).removeprefix('torch.') if auto else 'fp32'} here;"
          f" load average {load_before:.1f}", flush=True)
    fp32, bf16 = Runs("off"), Runs("bf16")
    n_val = 0
    for seed in range(args.seeds):
        order = (fp32, bf16) if seed % 2 == 0 else (bf16, fp32)
        for runs in order:
            result = train(TrainConfig(**{**base.to_dict(), "seed": seed, "amp": runs.amp}))
            n_val = result.data["n_val"]
            runs.final_val.append(result.history[-1]["val_acc"])
            runs.best_val.append(result.val_acc)
            runs.test.append(result.test_acc)
            runs.images_per_sec.append(result.images_per_sec)
        print(f"  seed {seed}: final val_acc fp32 {fp32.final_val[-1]:.4f} bf16"
              f" {bf16.final_val[-1]:.4f}; img/s fp32 {fp32.images_per_sec[-1]:.0f} bf16"
              f" {bf16.images_per_sec[-1]:.0f}", flush=True)

    print()
    print(f"{'':<22} {'fp32 (baseline)':>17} {'bf16':>17} {'bf16 - fp32':>12}")
    for label, a, b in (("final val_acc", fp32.final_val, bf16.final_val),
                        ("best-epoch val_acc", fp32.best_val, bf16.best_val),
                        ("best-epoch test_acc", fp32.test, bf16.test)):
        diff = statistics.fmean(b) - statistics.fmean(a)
        print(f"{label:<22} {mean_std(a):>17} {mean_std(b):>17} {diff:>+12.4f}")
    ratios = [b / a for a, b in zip(fp32.images_per_sec, bf16.images_per_sec, strict=True)]
    rounds = speed_rounds(base, args.speed_rounds)
    speed = statistics.median(rounds) if rounds else statistics.fmean(ratios)
    print(f"{'images/s (whole runs)':<22} {statistics.fmean(fp32.images_per_sec):>17.0f}"
          f" {statistics.fmean(bf16.images_per_sec):>17.0f}"
          f" {statistics.fmean(ratios):>11.2f}x")
    if rounds:
        print(f"{'images/s (rounds)':<22} {'':>17} {'':>17} {speed:>11.2f}x"
              f"  (median of {len(rounds)}: {', '.join(f'{r:.2f}' for r in rounds)})")
    print("(mean ± sample std over seeds; images/s: the trainer's own figure, evaluation"
          " excluded; whole runs: the mean of the per-seed bf16/fp32 ratios; rounds: see --help)")

    diffs = [a - b for a, b in zip(fp32.final_val, bf16.final_val, strict=True)]
    loss = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    one_image = 1 / max(n_val, 1)
    loses = loss > 2 * stderr and loss > one_image
    print(f"final val_acc, fp32 - bf16 paired over seeds: {loss:+.4f} (standard error"
          f" {stderr:.4f}; one of the {n_val} validation images is {one_image:.4f})")
    load_after = os.getloadavg()[0]
    print(f"load average {load_before:.1f} before, {load_after:.1f} after (this benchmark"
          " included)")
    verdict = "bf16 LOSES accuracy" if loses else "no accuracy loss from bf16"
    print(f"summary: {base.model} digits {base.epochs} epochs x {args.seeds} seeds: final val_acc"
          f" fp32 {mean_std(fp32.final_val)}, bf16 {mean_std(bf16.final_val)}: {verdict};"
          f" bf16 {speed:.2f}x the images/s of fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
