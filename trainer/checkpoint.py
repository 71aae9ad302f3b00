"""Checkpoints: written atomically, read with `weights_only=True` so a crafted file cannot run code.

`last.pt` (every epoch) holds everything a resumed run needs; `best.pt` (on improvement) holds the
weights, the config and the data facts needed to rebuild and use the model alone (export,
evaluation, distillation teacher).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError

FORMAT = 1
LAST = "last.pt"
BEST = "best.pt"


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint; anything that is not plain tensors and containers is refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others for foreign content
        raise ConfigError(
            f"checkpoint {str(path)!r} was refused: it is not a plain-weights file ({e})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {str(path)!r} was not written by this trainer")
    return payload
