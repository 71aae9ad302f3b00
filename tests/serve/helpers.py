"""Helpers for the prediction-service tests: a server as a real process, requests over real HTTP,
and image files of every kind a user has, made from the digits test images."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.helpers import stop_process

STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    log: Path

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit status."""
        return stop_process(self.proc, grace=60)


def start_server(cmd: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> Server:
    """Run `cmd --port P` and wait until GET /health answers."""
    port = port or free_port()
    full_env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("a") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port), "--threads", "1"], cwd=cwd,
                                env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.base}/health", timeout=5):
                return server
        except OSError as e:
            if time.monotonic() > deadline:
                server.stop()
                raise AssertionError(
                    f"no server within {STARTUP_SECONDS}s:\n{log.read_text()}") from e
            time.sleep(0.3)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.load(r)


def post(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
    """POST and return (status, parsed JSON body), 4xx included. A server may answer an
    oversized upload before reading it and close the connection: the answer is still read."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        # The answer may come before the whole body was sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", f"{parts.path}?{parts.query}" if parts.query else parts.path,
                         body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def multipart(data: bytes, *, field: str = "file", filename: str = "image.png") -> tuple[bytes,
                                                                                          str]:
    """A multipart/form-data body with one file part, as a browser or curl -F sends it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\";"
            f" filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def predict(base: str, data: bytes, query: str = "") -> tuple[int, Any]:
    body, kind = multipart(data)
    return post(f"{base}/predict{query}", body, kind)


def digit_image(index: int = 0) -> np.ndarray:
    """Image `index` of scikit-learn's digits as uint8 8x8, 0..255, white on black like the
    training data."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.rint(bunch.images[index] * (255.0 / 16.0)).astype(np.uint8)


def encode(pixels: np.ndarray, kind: str, size: int = 64) -> bytes:
    """The 8x8 grayscale `pixels` as a file of `kind`, upscaled to `size` px."""
    grey = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    if kind == "png-gray":
        grey.save(buf, "PNG")
    elif kind == "png-rgb":
        grey.convert("RGB").save(buf, "PNG")
    elif kind == "png-rgba":
        rgba = grey.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(buf, "PNG")
    elif kind == "png-palette":
        grey.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    elif kind == "png-16bit":
        wide = np.asarray(grey, dtype=np.uint16) * 257  # the same picture at 16 bits
        Image.fromarray(wide).save(buf, "PNG")
    elif kind == "jpeg":
        grey.convert("RGB").save(buf, "JPEG", quality=95)
    else:
        raise ValueError(kind)
    return buf.getvalue()


def large_jpeg(pixels: np.ndarray, width: int = 1600, height: int = 900) -> bytes:
    """`pixels` stretched to a large, non-square colour JPEG (small file, many pixels)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR).convert(
        "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress, so cutting it short truncates the pixel data."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A tiny file that decodes to side x side pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def run_module(args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
