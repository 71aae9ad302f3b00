"""Portable exports of a Bundle: TorchScript (`model.ts`) and ONNX (`model.onnx`), each checked
against the PyTorch model on real images (the test split) before it is kept.

Both files hold the whole ServingModule, ensembles included: input `pixels`, float32
(N, C, S, S) in [0, 1]; output `log_probs`, (N, classes), the log of the averaged softmax. The
batch dimension is dynamic. A file whose probabilities differ from PyTorch's by more than
`TOLERANCE` on any test image, or whose top-1 class differs, is not written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trainer.bundle import Bundle, ServingModule
from trainer.config import ConfigError, TrainConfig
from trainer.predict import to_input

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
TOLERANCE = 1e-4  # largest allowed |p_export - p_torch| over every class of every checked image
CHECK_IMAGES = 2048  # at most this many test images are compared (all of digits' 360)
_BATCH = 256


def parse_formats(text: str) -> list[str]:
    """`--format torchscript,onnx` (or `all`) as a list; an unknown name is a ConfigError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(FORMATS)
    bad = [n for n in names if n not in (*FORMATS, "pytorch")]
    if bad or not names:
        raise ConfigError(f"--format {text!r}: choose from pytorch, {', '.join(FORMATS)}, all"
                          " (comma-separated)")
    return [n for n in FORMATS if n in names]


def onnx_bytes(module: ServingModule) -> bytes:
    """The module as an ONNX model in memory, with a dynamic batch dimension."""
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings(), open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null):
        # The exporter prints its progress to stdout and logs each pass at INFO: neither belongs
        # in a CLI's output or a server's log.
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.WARNING)
        program = torch.onnx.export(
            module, (_example(module),), input_names=["pixels"], output_names=["log_probs"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
            verbose=False, optimize=True)
    for q, level in zip(quiet, levels, strict=True):
        q.setLevel(level)
    assert program is not None
    return compact(program.model_proto).SerializeToString()


def compact(model: Any) -> Any:
    """The ONNX model without what only debugging reads: the exporter's per-node stack traces
    and documentation (a third of a small ResNet's file) and intermediate shapes, which ONNX
    Runtime infers again at load time. Computation and names are unchanged."""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    del model.graph.value_info[:]
    return model


def torchscript_bytes(module: ServingModule) -> bytes:
    """The module traced to TorchScript (the ResNets have no data-dependent control flow)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (_example(module),), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _example(module: ServingModule) -> Tensor:
    channels, size = int(module.mean.shape[2]), module.image_size
    return torch.rand(2, channels, size, size)


def split_images(cfg: TrainConfig, limit: int = CHECK_IMAGES) -> Tensor:
    """Up to `limit` uint8 images of the model's test split (its own data, its own split)."""
    from trainer.config import with_overrides
    from trainer.data import load_data

    data = load_data(with_overrides(cfg, {"device": "cpu"}), torch.device("cpu"))
    split = "test" if data.n_test else "val"
    chunks, n = [], 0
    for x, _ in data.eval_batches(split, _BATCH):
        chunks.append(x.cpu())
        n += len(x)
        if n >= limit:
            break
    if not chunks:
        raise ConfigError(f"dataset {cfg.dataset!r} has no test or validation images to check"
                          " the export against")
    return torch.cat(chunks)[:limit]


def compare(bundle: Bundle, runtime: str, model: bytes, images: Tensor) -> dict[str, Any]:
    """Largest probability difference and top-1 agreement of an exported model vs PyTorch."""
    from trainer.predict import Predictor

    reference = Predictor(bundle, "torch")
    run: Callable[[Tensor], Tensor]  # images -> probabilities, from the exported file
    if runtime == "onnx":
        run = Predictor(bundle, "onnx", onnx_model=model).probabilities
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            loaded = torch.jit.load(io.BytesIO(model))

        def run_torchscript(x: Tensor) -> Tensor:
            with torch.inference_mode():
                return loaded(to_input(x)).exp()

        run = run_torchscript

    worst, agree = 0.0, 0
    for start in range(0, len(images), _BATCH):
        batch = images[start:start + _BATCH]
        want, got = reference.probabilities(batch), run(batch)
        worst = max(worst, float((want - got).abs().max()))
        agree += int((want.argmax(1) == got.argmax(1)).sum())
    return {"images": len(images), "max_abs_diff": worst, "tolerance": TOLERANCE,
            "top1_agree": agree}


def portable_files(bundle: Bundle, cfg: TrainConfig, formats: list[str]
                   ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Each format's file contents and its check, by format; nothing is written. A format
    that fails its check is a ConfigError, so an export is all or nothing."""
    if not formats:
        return {}, {}
    images = split_images(cfg)
    files, checks = {}, {}
    for name in formats:
        model = onnx_bytes(bundle.module) if name == "onnx" else torchscript_bytes(bundle.module)
        check = compare(bundle, name, model, images)
        if check["max_abs_diff"] > TOLERANCE or check["top1_agree"] != check["images"]:
            raise ConfigError(
                f"the {name} export differs from PyTorch on the test split (largest probability"
                f" difference {check['max_abs_diff']:.2e}, tolerance {TOLERANCE:.0e}; top-1"
                f" agrees on {check['top1_agree']} of {check['images']}); nothing was written")
        files[FILES[name]], checks[name] = model, {"file": FILES[name], **check}
    return files, checks

