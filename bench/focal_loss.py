"""Focal loss against cross entropy on an imbalanced image folder: does it help the rare classes?

What it answers: is `loss = "focal"` worth searching when classes are imbalanced? Only if, at
equal epochs and seeds, it raises the rare classes' recall or the macro-F1 over plain cross
entropy (the baseline, trained in the same run). The data: an ImageFolder written here from
scikit-learn's digits, four classes, two of them common and two rare at 1/8 of their count
(default 3 and 8 common at 160 images each, 5 and 9 rare at 20: the rare ones are each
confusable with a common one). Both losses train the same model on the same splits with the
same seeds; each seed also picks the split (`split_seed`), so the few rare test images differ
between seeds.

    .venv/bin/python bench/focal_loss.py                          # 10 seeds x 20 epochs, gamma 2
    .venv/bin/python bench/focal_loss.py --seeds 4 --gamma 1 --class-weights balanced

Printed per seed and as mean ± sample std over the seeds, for the kept epoch (the best val_acc,
as any run keeps it) on the test split: rare-class recall (the rare classes' test images
predicted as their class, pooled over the rare classes), macro-F1 and accuracy; the focal /
cross-entropy ratio of the means; and the paired focal - cross-entropy difference with its
standard error, so a difference smaller than the seeds' noise reads as none.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from trainer.config import TrainConfig
from trainer.contract import Result
from trainer.train import train

METRICS = ("rare recall", "macro-F1", "accuracy")


def write_imbalanced_digits(root: Path, counts: dict[int, int]) -> list[str]:
    """PNGs of the first `counts[d]` images of each digit d, one folder per digit; returns the
    class names in the trainer's order (sorted folder names)."""
    digits = load_digits()
    for digit, count in counts.items():
        folder = root / f"digit{digit}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == digit][:count]
        if len(images) < count:
            raise SystemExit(f"digits has {len(images)} images of {digit}, not {count}")
        for i, image in enumerate(images):
            pixels = (image * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{i:03d}.png")
    return sorted(f"digit{d}" for d in counts)


def scores(result: Result, rare: list[int]) -> dict[str, float]:
    """The kept epoch's test figures; rare recall pooled over the rare classes' test images."""
    assert result.confusion is not None and result.test_macro_f1 is not None
    rows = result.confusion
    hit = sum(rows[c][c] for c in rare)
    total = sum(sum(rows[c]) for c in rare)
    return {"rare recall": hit / max(total, 1), "macro-F1": result.test_macro_f1,
            "accuracy": result.test_acc or 0.0}


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds (default 10; at least 2)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--gamma", type=float, default=2.0, help="focal_gamma (default 2)")
    p.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                   help="for both losses alike (default none)")
    p.add_argument("--common", type=int, nargs="+", default=[3, 8], help="common digits")
    p.add_argument("--rare", type=int, nargs="+", default=[5, 9], help="rare digits")
    p.add_argument("--common-count", type=int, default=160, help="images per common digit")
    p.add_argument("--rare-count", type=int, default=20, help="images per rare digit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2: a spread needs two runs")
    if set(args.common) & set(args.rare):
        p.error("a digit cannot be common and rare")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    counts = {d: args.common_count for d in args.common} | {d: args.rare_count for d in args.rare}
    load_before = os.getloadavg()[0]
    print(f"focal loss (gamma {args.gamma}) against cross entropy, {datetime.date.today()}:"
          f" digits {sorted(args.common)} x {args.common_count} common,"
          f" {sorted(args.rare)} x {args.rare_count} rare; resnet20 width 0.25, 8 px,"
          f" {args.epochs} epochs, batch 32, lr 0.1, class_weights {args.class_weights},"
          f" {args.seeds} seeds; {torch.get_num_threads()} torch threads, load average"
          f" {load_before:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        classes = write_imbalanced_digits(Path(tmp), counts)
        rare = [classes.index(f"digit{d}") for d in args.rare]
        base = TrainConfig(
            dataset=f"imagefolder:{tmp}", image_size=8, model="resnet20", width=0.25,
            batch_size=32, lr=0.1, crop_pad=0, hflip=False, epochs=args.epochs, device="cpu",
            amp="off", class_weights=args.class_weights, test_fraction=0.3,
        )  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {"cross_entropy": [], "focal": []}
        n_rare_test = 0
        for seed in range(args.seeds):
            for loss in ("cross_entropy", "focal") if seed % 2 == 0 else ("focal", "cross_entropy"):
                cfg = TrainConfig(**{**base.to_dict(), "seed": seed, "split_seed": seed,
                                     "loss": loss, "focal_gamma": args.gamma})
                result = train(cfg)
                runs[loss].append(scores(result, rare))
                assert result.confusion is not None
                n_rare_test = sum(sum(result.confusion[c]) for c in rare)
            ce, focal = runs["cross_entropy"][-1], runs["focal"][-1]
            print(f"  seed {seed}: " + "; ".join(
                f"{m} ce {ce[m]:.3f} focal {focal[m]:.3f}" for m in METRICS
            ) + f" ({n_rare_test} rare test images)", flush=True)

    print()
    print(f"{'':<14} {'cross entropy':>17} {'focal':>17} {'focal/ce':>9}"
          f" {'focal - ce paired':>22}")
    summary = []
    for m in METRICS:
        a = [r[m] for r in runs["cross_entropy"]]
        b = [r[m] for r in runs["focal"]]
        diffs = [y - x for x, y in zip(a, b, strict=True)]
        stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
        ratio = statistics.fmean(b) / statistics.fmean(a) if statistics.fmean(a) else math.nan
        print(f"{m:<14} {mean_std(a):>17} {mean_std(b):>17} {ratio:>8.3f}x"
              f" {statistics.fmean(diffs):>+13.4f} ± {stderr:.4f}")
        summary.append(f"{m} {ratio:.3f}x ({statistics.fmean(diffs):+.4f} ± {stderr:.4f})")
    print("(mean ± sample std over seeds; paired: mean difference ± its standard error)")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (this"
          " benchmark included)")
    print(f"summary: focal/cross entropy, {args.epochs} epochs x {args.seeds} seeds: "
          + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
