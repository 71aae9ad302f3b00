"""int8 exports: the ONNX model (trainer.portable) quantized by ONNX Runtime, checked on the test
split against the fp32 model before it is kept.

Static quantization, QDQ format: weights int8 per output channel, activations uint8 with scales
calibrated on images of the model's own train split (never the test split, which only measures
the result). BatchNorm is folded into the convolutions first (ONNX Runtime's pre-processing), so
a ResNet becomes int8 convolutions with fp32 only at the edges. The file is 2.3-3.3x smaller than
the fp32 one on the models of BENCHMARKS.md (nearer 4x as models grow); on CPUs with int8
dot-product units it also runs faster.

Quantization changes predictions, so unlike the fp32 formats it is not held to a probability
tolerance: `check` measures test accuracy of both and their top-1 agreement, and an int8 model
that loses more than `max_drop` of accuracy is refused, nothing written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.bundle import Bundle
from trainer.config import ConfigError, TrainConfig
from trainer.contract import MAX_DROP

FILE = "model.int8.onnx"
MODES = ("int8",)  # `--quantize` values
CALIBRATION_IMAGES = 512  # train images the activation ranges are measured on
_BATCH = 64


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--quantize {mode!r}: the only mode is int8")


def check_max_drop(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--max-accuracy-drop must be between 0 and 1 (a fraction of the test"
                          f" images), not {value}")


def labelled(cfg: TrainConfig, split: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """uint8 images and labels of one split of the model's own data (no augmentation): the
    test and validation splits in their fixed order, the train split in a seeded shuffle. The
    splits are sorted by index, and an ImageFolder's indices by class, so the first images of
    the train split would calibrate on one class only."""
    from trainer.config import with_overrides
    from trainer.data import load_data

    data = load_data(with_overrides(cfg, {"device": "cpu"}), torch.device("cpu"))
    xs, ys, n = [], [], 0
    batches = (data.train_batches(256, torch.Generator().manual_seed(0)) if split == "train"
               else data.eval_batches(split, 256))
    for x, y in batches:
        xs.append(x.cpu())
        ys.append(y.cpu())
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ConfigError(f"dataset {cfg.dataset!r} has no {split} images to quantize or check"
                          " the int8 model with")
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


def quantize(fp32: bytes, calibration: Tensor) -> bytes:
    """The fp32 ONNX model as a static int8 QDQ model, activations calibrated on `calibration`
    (uint8 N, C, S, S)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [(calibration[i:i + _BATCH].float() / 255).numpy()
               for i in range(0, len(calibration), _BATCH)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._left, None)
            return None if batch is None else {"pixels": batch}

    with tempfile.TemporaryDirectory(prefix="hpo-int8-") as tmp:
        raw, prepared, out = (Path(tmp) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        raw.write_bytes(fp32)
        # Shape inference and graph optimisation (BatchNorm folded into Conv) first, as ONNX
        # Runtime's quantization guide asks: unfolded BatchNorm would stay fp32 between
        # quantize/dequantize pairs and cost accuracy for nothing.
        quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
            # The convolutions, the classifier and what lies between them; the normalisation at
            # the input and the softmax average and log at the end stay fp32, so the output is
            # still a log-probability a threshold can be put on.
            op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool",
                                  "AveragePool", "MaxPool"])
        import onnx

        from trainer.portable import compact

        return bytes(compact(onnx.load(str(out))).SerializeToString())


def accuracy(run: Any, images: Tensor, labels: Tensor) -> tuple[float, Tensor]:
    """Top-1 accuracy of `run` (uint8 images -> probabilities) and its predicted classes."""
    preds = torch.cat([run(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return float((preds == labels).double().mean()), preds


def check(bundle: Bundle, fp32: bytes, int8: bytes, cfg: TrainConfig,
          max_drop: float = MAX_DROP) -> dict[str, Any]:
    """Test accuracy of the fp32 ONNX model and of the int8 one, their agreement and file sizes;
    a ConfigError when int8 loses more than `max_drop`."""
    from trainer.predict import Predictor

    images, labels = labelled(cfg, "test")
    fp32_acc, fp32_pred = accuracy(Predictor(bundle, "onnx", onnx_model=fp32).probabilities,
                                   images, labels)
    int8_acc, int8_pred = accuracy(Predictor(bundle, "int8", onnx_model=int8).probabilities,
                                   images, labels)
    result = {"file": FILE, "images": len(images), "fp32_test_accuracy": fp32_acc,
              "int8_test_accuracy": int8_acc, "top1_agree": int((fp32_pred == int8_pred).sum()),
              "fp32_bytes": len(fp32), "int8_bytes": len(int8), "max_drop": max_drop}
    if fp32_acc - int8_acc > max_drop:
        raise ConfigError(
            f"the int8 model loses {100 * (fp32_acc - int8_acc):.2f} points of test accuracy"
            f" ({100 * fp32_acc:.2f}% fp32, {100 * int8_acc:.2f}% int8, on {len(images)} test"
            f" images), more than --max-accuracy-drop {max_drop}; nothing was written")
    return result


def calibrated(fp32: bytes, cfg: TrainConfig) -> bytes:
    """The int8 model of `fp32`, calibrated on CALIBRATION_IMAGES of `cfg`'s train split."""
    return quantize(fp32, labelled(cfg, "train", CALIBRATION_IMAGES)[0])


def int8_file(bundle: Bundle, fp32: bytes, cfg: TrainConfig, max_drop: float = MAX_DROP
              ) -> tuple[bytes, dict[str, Any]]:
    """The checked int8 model's bytes and its check; nothing is written."""
    model = calibrated(fp32, cfg)
    return model, check(bundle, fp32, model, cfg, max_drop)
