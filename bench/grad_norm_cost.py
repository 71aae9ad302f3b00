"""What recording the gradient norm costs a training step: the norm and its on-device record
(`StepRunner._record_norm` after `get_total_norm`, what a step without `grad_clip` adds) timed
alone on a model's real gradients, against the whole step (`StepRunner.step`) on digits.

    .venv/bin/python bench/grad_norm_cost.py [--widths 0.25 1.0] [--threads 1]

Prints per width the median of `--rounds` rounds (each the mean over `--steps` calls) of both.
About 10 s on one thread. With `grad_clip` set the norm is the clip's own (free); the record is
left, a few microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from trainer.augment import eval_transform, mean_std_tensors
from trainer.config import TrainConfig
from trainer.data import load_data
from trainer.device import resolve_runtime
from trainer.models import build_model
from trainer.optim import make_optimizer, set_lr
from trainer.step import StepRunner


def median_seconds(run: Callable[[], None], *, steps: int, rounds: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            run()
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def measure(width: float, batch_size: int, steps: int, rounds: int) -> tuple[int, float, float]:
    """(parameters, seconds a step, seconds of the norm and its record) at `width`."""
    cpu = torch.device("cpu")
    cfg = TrainConfig(dataset="digits", width=width, batch_size=batch_size, device="cpu",
                      amp="off")
    data = load_data(cfg, cpu)
    mean, std = mean_std_tensors(data.mean, data.std, cpu)
    x, y = next(data.train_batches(batch_size, torch.Generator().manual_seed(0)))
    x = eval_transform(x, mean=mean, std=std)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_classes, data.in_channels)
    optimizer = make_optimizer(model, cfg)
    set_lr(optimizer, 0.05)
    runner = StepRunner(cfg, resolve_runtime("cpu", "off"), model, optimizer,
                        torch.amp.GradScaler("cpu", enabled=False), None, None)
    step = median_seconds(lambda: runner.step(x, y, epoch=1, step=0), steps=steps,
                          rounds=rounds)
    grads = [q.grad for q in runner.params if q.grad is not None]
    norm = median_seconds(lambda: runner._record_norm(torch.nn.utils.get_total_norm(grads)),
                          steps=steps * 10, rounds=rounds)
    return sum(q.numel() for q in runner.params), step, norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} thread(s), batch"
          f" {args.batch_size}, fp32")
    print(f"{'width':>6} {'params':>8} {'step ms':>8} {'norm+record us':>15} {'share':>6}")
    for width in args.widths:
        params, step, norm = measure(width, args.batch_size, args.steps, args.rounds)
        print(f"{width:>6} {params:>8} {step * 1e3:>8.2f} {norm * 1e6:>15.0f}"
              f" {norm / step:>6.1%}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
