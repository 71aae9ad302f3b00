"""int8 export against the fp32 ONNX model: test accuracy, file size and CPU inference speed.

What it answers: what does `hpo export --quantize int8` cost in accuracy, and what does it buy in
file size and images per second on ONNX Runtime's CPU provider? Each model is trained here on
offline data (digits, and the harder digits-hard of trainer/hard_tasks.py), exported through the
same `trainer.export.export_bundle` that `hpo export --quantize int8` calls (calibrated on 512
train images, checked on the test split), then both files are timed on the same batches of test
images in the same process, alternating, so load moves both alike.

    .venv/bin/python bench/int8_export.py                 # four models, about 4 minutes
    .venv/bin/python bench/int8_export.py --threads 2 --repeats 20

Printed per model: test accuracy fp32 and int8 (and their top-1 agreement), both sizes and
their ratio, images per second of each at batch 256 and their ratio (int8 / fp32, above 1 is
faster). Speed depends on the CPU's int8 instructions (VNNI/AMX make int8 faster; without them
QDQ models can be slower than fp32): the ratio is this machine's, not a promise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from trainer.config import TrainConfig
from trainer.export import export_bundle
from trainer.predict import to_input
from trainer.quantize import labelled
from trainer.saved_model import saved_config
from trainer.train import train

# name: (dataset, image size (0: its own), depth, width, epochs, lr, batch size). lr near 1 on
# digits-hard (README). digits at 32x32 has CIFAR's input size, so CIFAR's compute per image.
MODELS = {
    "digits resnet20 w1": ("digits", 0, "resnet20", 1.0, 15, 0.1, 64),
    "digits resnet56 w0.5": ("digits", 0, "resnet56", 0.5, 15, 0.1, 64),
    "digits-hard resnet20 w0.5": ("digits-hard", 0, "resnet20", 0.5, 8, 1.0, 128),
    "digits@32 resnet20 w1": ("digits", 32, "resnet20", 1.0, 15, 0.1, 64),
}
BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated names of MODELS")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    p.add_argument("--repeats", type=int, default=10, help="timed passes over the test split")
    return p.parse_args(argv)


def trained(name: str, folder: Path, threads: int) -> Path:
    dataset, size, model, width, epochs, lr, batch = MODELS[name]
    cfg = TrainConfig(dataset=dataset, image_size=size, model=model, width=width, epochs=epochs,
                      lr=lr, batch_size=batch, device="cpu", amp="bf16", seed=0,
                      checkpoint_dir=str(folder), num_workers=0 if threads == 1 else 2)
    train(cfg)
    return folder / "best.pt"


def images_per_second(path: Path, pixels: np.ndarray, threads: int, repeats: int) -> list[float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batches = [pixels[i:i + BATCH] for i in range(0, len(pixels), BATCH)]
    session.run(None, {"pixels": batches[0]})  # warm-up: allocation and kernel choice
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            session.run(None, {"pixels": b})
        rates.append(len(pixels) / (time.perf_counter() - start))
    return rates


def measure(name: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    best = trained(name, root / "train", args.threads)
    out, checks = export_bundle([best], root / "export", [{"study": "bench", "stage": name,
                                                           "trial": 0, "value": 0.0}],
                                ["onnx"], "int8", max_drop=1.0)
    c = checks["int8"]
    cfg = saved_config(torch.load(best, weights_only=True))
    pixels = to_input(labelled(cfg, "test")[0]).numpy()
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(2):  # alternate, so a burst of load lands on both
        for kind, file in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
            rates[kind] += images_per_second(out / file, pixels, args.threads, args.repeats // 2)
    return {"fp32_acc": c["fp32_test_accuracy"], "int8_acc": c["int8_test_accuracy"],
            "agree": c["top1_agree"] / c["images"], "images": c["images"],
            "fp32_mb": c["fp32_bytes"] / 1e6, "int8_mb": c["int8_bytes"] / 1e6,
            "fp32_ips": statistics.median(rates["fp32"]),
            "int8_ips": statistics.median(rates["int8"])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    torch.set_num_threads(args.threads)
    print(f"int8 export, {datetime.date.today()}; {args.threads} thread(s), ONNX Runtime"
          f" {ort.__version__}, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    header = (f"{'model':<28}{'test acc fp32':>14}{'int8':>8}{'agree':>7}{'MB fp32':>9}"
              f"{'int8':>7}{'ratio':>7}{'img/s fp32':>12}{'int8':>8}{'ratio':>7}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for i, name in enumerate(names):
            r = measure(name, Path(tmp) / str(i), args)
            rows.append(
                f"{name:<28}{100 * r['fp32_acc']:>13.2f}%{100 * r['int8_acc']:>7.2f}%"
                f"{100 * r['agree']:>6.1f}%{r['fp32_mb']:>9.2f}{r['int8_mb']:>7.2f}"
                f"{r['fp32_mb'] / r['int8_mb']:>6.2f}x{r['fp32_ips']:>12.0f}"
                f"{r['int8_ips']:>8.0f}{r['int8_ips'] / r['fp32_ips']:>6.2f}x")
            print(f"  {name}: done ({r['images']} test images)", flush=True)
    print(header, *rows, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
