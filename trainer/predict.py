"""From a user's image file to class probabilities: decoding, the evaluation transform, and the two
runtimes (PyTorch eager and ONNX Runtime) a server can run a Bundle on.

Decoding accepts what people have: RGB, RGBA, grayscale, palette, CMYK, 16-bit PNG, JPEG, of any
size. It is resized the way training resized (`trainer.datasets.decode_image`: PIL bilinear, which
antialiases when shrinking, to a square), converted to the model's channels, and scaled to
[0, 1]; the per-member normalisation is inside the ServingModule. Every problem is an `ImageError`
with one sentence a user can act on.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.bundle import Bundle
from trainer.serve import MAX_PIXELS, RUNTIMES


class ImageError(ValueError):
    """An upload that cannot be turned into a model input; `status` is the HTTP answer's."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, size: int, channels: int, max_pixels: int = MAX_PIXELS) -> Tensor:
    """Image bytes as uint8 (channels, size, size)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("the upload is empty: send an image file")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit raises) on huge images; ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise ImageError(
                        f"the image is {width}x{height} pixels, more than the limit of"
                        f" {max_pixels} pixels", 413)
                image.load()
                return _to_tensor(image, size, channels)
    except UnidentifiedImageError:
        raise ImageError("the upload is not an image PIL can read (PNG, JPEG, BMP, GIF, TIFF,"
                         " WebP...)", 415) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image is too large to decode safely ({e})", 413) from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        # PIL reports a cut-off file as OSError ("image file is truncated", "broken data stream").
        raise ImageError(f"the image file is damaged or truncated ({e})", 422) from None


def _to_tensor(image: Any, size: int, channels: int) -> Tensor:
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: PIL's convert("L") clips at 255, which turns most of a
        # 16-bit image white. Scale the full range to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
        if image.mode == "I" and array.max() <= 255:
            top = 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA")  # a palette with transparency goes through RGBA
    # As training read image folders: alpha is dropped, not composited (decode_image).
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_input(images: Tensor) -> Tensor:
    """uint8 (N, C, S, S) -> the ServingModule's float32 input in [0, 1]."""
    return images.float().div_(255)


class Predictor:
    """A Bundle on one runtime; `probabilities` is safe to call from several threads."""

    def __init__(self, bundle: Bundle, runtime: str = "torch", onnx_model: bytes | None = None,
                 threads: int = 0) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.bundle = bundle
        self.runtime = runtime
        self._session: Any = None
        if runtime == "int8" and onnx_model is None:
            # Quantizing needs calibration images of the model's data, which a Bundle lacks.
            raise ValueError("the int8 runtime needs the quantized model's bytes"
                             " (trainer.quantize.int8_file, or an export's model.int8.onnx)")
        if runtime in ("onnx", "int8"):
            import onnxruntime as ort

            from trainer.portable import onnx_bytes

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            model = onnx_model if onnx_model is not None else onnx_bytes(bundle.module)
            self._session = ort.InferenceSession(model, options,
                                                 providers=["CPUExecutionProvider"])

    def probabilities(self, images: Tensor) -> Tensor:
        """uint8 (N, C, S, S) -> float32 (N, classes), rows summing to 1."""
        x = to_input(images)
        if self._session is not None:
            (out,) = self._session.run(None, {"pixels": x.numpy()})
            return torch.from_numpy(out).exp()
        with torch.inference_mode():
            return self.bundle.module(x).exp()

    def decode(self, data: bytes, max_pixels: int = MAX_PIXELS) -> Tensor:
        """An image file -> the model's uint8 (C, S, S) input; ImageError when it is not one."""
        return decode_upload(data, self.bundle.image_size, self.bundle.in_channels, max_pixels)

    def top(self, probs: Tensor, top_k: int) -> list[dict]:
        """One image's probabilities -> its top-k classes: [{"index", "name", "probability"}],
        best first."""
        classes = self.bundle.classes
        values, indices = probs.topk(max(1, min(top_k, len(classes))))
        return [{"index": int(i), "name": classes[int(i)], "probability": float(v)}
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)]

    def predict(self, data: bytes, top_k: int, max_pixels: int = MAX_PIXELS) -> list[dict]:
        """One image file's top-k classes, in a forward pass of its own."""
        return self.top(self.probabilities(self.decode(data, max_pixels)[None])[0], top_k)
