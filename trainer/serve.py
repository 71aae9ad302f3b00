"""`python -m trainer.serve EXPORT_DIR`: an HTTP prediction service for an exported model or
ensemble (no database needed), on FastAPI and uvicorn, bound to 127.0.0.1 by default.

    GET  /         a page: choose or drop an image, see the top-3 classes as bars
    POST /predict  multipart field `file` (or a raw image body); `top_k`, `threshold` optional
    GET  /health   {"status": "ok", "runtime", "kind", "batching": {limits and counts}}
    GET  /model    study, trial, metrics, classes, input size, preprocessing

A bad upload is answered 4xx with {"error": "<one sentence>"}; the upload is only ever held in
memory (the body is read up to the size limit before it is parsed), so nothing reaches the disk.
With `--max-batch N` (N > 1) requests that arrive together share a forward pass
(trainer.batching; `--batch-wait-ms`); by default each has its own.
`hpo serve STUDY` (search/results/serve.py) builds the model from a study and calls `serve`.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time,
# and they name classes imported inside make_app.
import argparse
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.predict import Predictor

# Kept here, not in trainer.predict, so `hpo`'s parser can take these flags without torch.
MAX_PIXELS = 40_000_000  # width x height; a decompression bomb is refused before decoding
RUNTIMES = ("torch", "onnx", "int8")
MAX_UPLOAD = 10 * 1024 * 1024
DEFAULT_THRESHOLD = 0.7
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 1  # batching is opt-in: BENCHMARKS.md, prediction latency
DEFAULT_BATCH_WAIT_MS = 0.0  # take what queued during the last pass; never wait when idle
MAX_BATCH_WAIT_MS = 10_000.0


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_app(predictor: "Predictor", *, threshold: float = DEFAULT_THRESHOLD,
             max_upload: int = MAX_UPLOAD, max_pixels: int = MAX_PIXELS,
             max_batch: int = DEFAULT_MAX_BATCH,
             batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> Any:
    """The FastAPI application serving `predictor`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from trainer.batching import Batcher
    from trainer.predict import ImageError
    from trainer.serve_page import page

    batcher = Batcher(predictor.probabilities, max_batch, batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await batcher.close()

    app = FastAPI(title="resnet-hpo prediction service", docs_url="/docs", redoc_url=None,
                  lifespan=lifespan)
    described = {**predictor.bundle.describe(), "runtime": predictor.runtime,
                 "threshold": threshold, "max_upload_bytes": max_upload,
                 "max_pixels": max_pixels}
    html = page(described)

    @app.exception_handler(HttpError)
    async def _http_error(_: Request, e: HttpError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _starlette_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"},
                            status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return html

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "runtime": predictor.runtime, "kind": predictor.bundle.kind,
                "batching": {"max_batch": max_batch, "wait_ms": batch_wait_ms,
                             **dataclasses.asdict(batcher.stats)}}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return described

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3,
                      threshold: float | None = None) -> dict[str, Any]:
        cut = described["threshold"] if threshold is None else threshold
        if not 0.0 <= cut <= 1.0:
            raise HttpError(400, f"threshold must be between 0 and 1, not {cut}")
        if top_k < 1:
            raise HttpError(400, f"top_k must be at least 1, not {top_k}")
        data = await _read_image(request, max_upload)
        try:
            # Decoding and the forward pass hold the GIL only in parts: off the event loop.
            if max_batch == 1:
                top = await run_in_threadpool(predictor.predict, data, top_k, max_pixels)
            else:
                image = await run_in_threadpool(predictor.decode, data, max_pixels)
                top = predictor.top(await batcher.submit(image), top_k)
        except ImageError as e:
            raise HttpError(e.status, str(e)) from None
        best = top[0]
        unknown = best["probability"] < cut
        return {"label": "unknown" if unknown else best["name"], "unknown": unknown,
                "threshold": cut, "predictions": top}

    return app


async def _read_image(request: Any, limit: int) -> bytes:
    """The image bytes of a multipart upload (field `file`) or of a raw body, read only up to
    `limit` bytes so an oversized upload is refused without being stored."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the upload is {int(declared)} bytes, more than the limit of"
                             f" {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"the upload is more than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HttpError(400, "the request body is empty: send an image file")
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        return body
    return await _multipart_file(request.headers, body, limit)


async def _multipart_file(headers: Any, body: bytes, limit: int) -> bytes:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> Any:
        yield body

    parser = MultiPartParser(headers, once(), max_files=1, max_fields=10)
    parser.spool_max_size = limit + 1  # keep the part in memory: the body is already bounded
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise HttpError(400, f"the multipart body could not be read: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HttpError(400, "the multipart body has no file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


def serve(predictor: "Predictor", *, host: str, port: int, threshold: float,
          max_upload: int = MAX_UPLOAD, max_pixels: int = MAX_PIXELS,
          max_batch: int = DEFAULT_MAX_BATCH, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> int:
    """Run the service until SIGINT or SIGTERM (uvicorn finishes requests in flight)."""
    import uvicorn

    check_threshold(threshold)
    check_batching(max_batch, batch_wait_ms)
    app = make_app(predictor, threshold=threshold, max_upload=max_upload, max_pixels=max_pixels,
                   max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    b = predictor.bundle
    print(f"serving {b.kind} model ({len(b.members)} member(s), {len(b.classes)} classes,"
          f" {predictor.runtime}) on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    _server_class()(config).run()
    return 0


def _server_class() -> type:
    import uvicorn

    class QuietExit(uvicorn.Server):
        """uvicorn, which raises SIGTERM/SIGINT again once it has shut down gracefully (exit
        status -15, or a KeyboardInterrupt): here a stop that finished its requests exits 0, like
        `hpo worker`, so a service manager does not count it as a crash."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return QuietExit


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be between 0 and 1, not {threshold}")


def check_batching(max_batch: int, wait_ms: float) -> None:
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, not {max_batch}")
    if not 0 <= wait_ms <= MAX_BATCH_WAIT_MS:
        raise ConfigError(
            f"--batch-wait-ms must be between 0 and {MAX_BATCH_WAIT_MS:g}, not {wait_ms:g}")


def add_flags(p: argparse.ArgumentParser) -> None:
    """The flags both serve commands take."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="top probability under which the answer is 'unknown' (default"
                        f" {DEFAULT_THRESHOLD}; the page has a field for it)")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (PyTorch eager), onnx (ONNX Runtime) or int8 (ONNX Runtime,"
                        " the model quantized by `hpo export --quantize int8`)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD / 2**20,
                   help="largest upload accepted (default 10)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"largest width x height decoded (default {MAX_PIXELS})")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for inference")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="most images in one forward pass when requests arrive together"
                        f" (default {DEFAULT_MAX_BATCH}: a pass per request; 32 serves more"
                        " requests a second under load on PyTorch, at some latency alone)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help="how long a request waits for others to share its pass (default"
                        f" {DEFAULT_BATCH_WAIT_MS:g})")


def start(bundle: Any, args: argparse.Namespace, onnx_model: bytes | None = None) -> int:
    """Both serve commands end here: the Predictor on the chosen runtime, then the server."""
    import torch

    check_threshold(args.threshold)
    check_batching(args.max_batch, args.batch_wait_ms)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from trainer.predict import Predictor

    predictor = Predictor(bundle, args.runtime, onnx_model=onnx_model, threads=args.threads)
    return serve(predictor, host=args.host, port=args.port, threshold=args.threshold,
                 max_upload=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                 max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)


def _exported_model(folder: Path, runtime: str) -> bytes | None:
    """The checked file `hpo export` wrote for `runtime`: model.onnx (else the model is
    converted in memory at start-up) or model.int8.onnx (required: quantizing needs the
    training data, which an export folder does not carry)."""
    from trainer.portable import FILES
    from trainer.quantize import FILE

    if runtime == "int8":
        if not (folder / FILE).is_file():
            raise ConfigError(f"{folder} has no {FILE}: export it with `hpo export STUDY"
                              " --quantize int8`, or serve another --runtime")
        return (folder / FILE).read_bytes()
    onnx_file = folder / FILES["onnx"]
    return onnx_file.read_bytes() if runtime == "onnx" and onnx_file.is_file() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.serve",
                                description="Serve an exported model (hpo export) over HTTP.")
    p.add_argument("export", type=Path, help="a folder written by `hpo export`")
    add_flags(p)
    args = p.parse_args(argv)
    try:
        from trainer.bundle import load_export

        check_threshold(args.threshold)
        check_batching(args.max_batch, args.batch_wait_ms)
        bundle = load_export(args.export)
        return start(bundle, args, _exported_model(args.export, args.runtime))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
