"""Prediction-service latency over real HTTP on the CPU: our server (`python -m trainer.serve`) on
PyTorch and on ONNX Runtime, one model and a 3-model ensemble, against the handler most tutorials
write, measured in the same run.

    .venv/bin/python bench/serve_latency.py                 # about 2 minutes on 2 idle cores
    .venv/bin/python bench/serve_latency.py --requests 600 --clients 1,8,16

The baseline is a FastAPI app with the model loaded once, and per request: `UploadFile.read()`,
`PIL.Image.open`, torchvision `transforms.Compose([Grayscale, Resize, ToTensor, Normalize])`, and
`model(x)` in eager mode under `torch.no_grad()`, then softmax and top-3. Every server is a
separate process on uvicorn with one torch/ORT thread; the client is this process, with 1 or 8
threads each holding a keep-alive connection and posting 64x64 PNGs of digits (multipart, as a
browser sends them). Figures: p50 and p99 latency in milliseconds and requests per second. The
models are three resnet20 (width 1, the demo's) trained for a few epochs on digits here, so the
benchmark needs nothing on disk. On a shared machine, trust the ratios more than the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import child_env


def _serve_baseline(export: str, port: int) -> None:
    import torch
    import uvicorn

    from bench._tutorial_server import make_app

    torch.set_num_threads(1)
    uvicorn.run(make_app(export), host="127.0.0.1", port=port, log_level="warning")


def train_models(folder: Path, epochs: int) -> tuple[Path, Path]:
    """Three seeds of the demo's model on digits; exports of the first alone and of all three,
    both with their ONNX files."""
    from trainer.config import TrainConfig
    from trainer.export import export_bundle
    from trainer.train import train

    bests = []
    for seed in (1, 2, 3):
        cfg = TrainConfig(dataset="digits", model="resnet20", width=1.0, crop_pad=1, epochs=epochs,
                          lr=0.1, batch_size=64, seed=seed, device="cpu",
                          checkpoint_dir=str(folder / f"seed{seed}"))
        result = train(cfg)
        print(f"  trained seed {seed}: val_acc {result.val_acc:.3f}", flush=True)
        bests.append(Path(result.checkpoint))
    members = [{"study": "bench", "stage": "-", "trial": i, "value": None} for i in range(3)]
    single, _ = export_bundle(bests[:1], folder / "single", members[:1], ["onnx"])
    ensemble, _ = export_bundle(bests, folder / "ensemble", members, ["onnx"])
    return single, ensemble


def _images(n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i in range(n):
        pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _multipart(data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def _start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/openapi.json")
            conn.getresponse().read()
            conn.close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")


def measure(port: int, bodies: list[tuple[bytes, str]], clients: int,
            requests: int) -> dict[str, float]:
    """`requests` posts shared by `clients` threads; latency of each, and the overall rate."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        for i in counter:  # a shared iterator: the GIL makes next() atomic
            body, kind = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t0)
            if r.status != 200:
                with lock:
                    errors.append(f"status {r.status}")
                return
        conn.close()
        with lock:
            latencies.extend(mine)

    for body, kind in bodies[:5]:  # warm-up: first calls allocate and JIT-select kernels
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/predict", body=body, headers={"Content-Type": kind})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"the server answered {r.status}: {r.read()[:500]!r}")
        r.read()
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors or not latencies:
        raise SystemExit(f"the server answered {errors[:3]} ({len(latencies)} answers)")
    ms = sorted(v * 1000 for v in latencies)
    return {"p50": statistics.median(ms), "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "rps": len(ms) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="per variant and client count")
    p.add_argument("--clients", default="1,8", help="comma-separated client counts")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of each model")
    p.add_argument("--baseline-server", nargs=2, metavar=("EXPORT", "PORT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_server:
        _serve_baseline(args.baseline_server[0], int(args.baseline_server[1]))
        return 0
    clients = [int(c) for c in args.clients.split(",")]
    print(f"# serve_latency {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC,"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        single, ensemble = train_models(folder, args.epochs)
        bodies = [_multipart(d) for d in _images(64)]
        me = Path(__file__).resolve()
        ours = [sys.executable, "-m", "trainer.serve"]
        variants = [
            ("baseline (tutorial handler)", "1 model", "torch eager",
             lambda port: [sys.executable, str(me), "--baseline-server", str(single), str(port)]),
            ("ours", "1 model", "torch",
             lambda port: [*ours, str(single), "--port", str(port), "--threads", "1"]),
            ("ours", "1 model", "onnx", lambda port: [*ours, str(single), "--port", str(port),
                                                      "--threads", "1", "--runtime", "onnx"]),
            # Batching on (requests that queue together share a pass), beside the default.
            ("ours, --max-batch 32", "1 model", "torch",
             lambda port: [*ours, str(single), "--port", str(port), "--threads", "1",
                           "--max-batch", "32"]),
            ("ours, --max-batch 32", "1 model", "onnx",
             lambda port: [*ours, str(single), "--port", str(port), "--threads", "1",
                           "--runtime", "onnx", "--max-batch", "32"]),
            ("ours", "3-model ensemble", "torch",
             lambda port: [*ours, str(ensemble), "--port", str(port), "--threads", "1"]),
            ("ours", "3-model ensemble", "onnx", lambda port: [*ours, str(ensemble), "--port",
                                                               str(port), "--threads", "1",
                                                               "--runtime", "onnx"]),
        ]
        rows = []
        for name, model, runtime, cmd in variants:
            port = _free_port()
            proc = _start(cmd(port), port, folder / f"{len(rows)}.log")
            try:
                for c in clients:
                    m = measure(port, bodies, c, args.requests)
                    rows.append((name, model, runtime, c, m))
                    print(f"  {name}, {model}, {runtime}, {c} client(s): p50 {m['p50']:.2f} ms"
                          f"  p99 {m['p99']:.2f} ms  {m['rps']:.0f} req/s", flush=True)
                if "--max-batch" in name:
                    b = _health(port)["batching"]
                    print(f"    forward passes {b['batches']}, images {b['images']} (largest"
                          f" batch {b['largest']}, max {b['max_batch']})", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    base = {r[3]: r[4] for r in rows if r[0].startswith("baseline")}
    print("\n| server | model | runtime | clients | p50 ms | p99 ms | req/s | req/s vs baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, runtime, c, m in rows:
        print(f"| {name} | {model} | {runtime} | {c} | {m['p50']:.2f} | {m['p99']:.2f} |"
              f" {m['rps']:.0f} | {m['rps'] / base[c]['rps']:.2f}x |")
    print(f"\n{args.requests} requests per row; load average at the end"
          f" {os.getloadavg()[0]:.2f}")
    return 0


def _health(port: int) -> dict:
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
