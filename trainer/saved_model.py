"""Rebuild a trained model from a `best.pt`: for distillation teachers, export and evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint
from trainer.config import TrainConfig, with_overrides
from trainer.models import build_model

# A persistent worker distils many trials from one teacher: keep the last few in memory.
_CACHE: dict[tuple[str, float, str], tuple[nn.Module, dict[str, Any]]] = {}
_CACHE_SIZE = 2


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode with frozen weights, and the checkpoint's payload (config, data)."""
    path = Path(path)
    if path.is_dir():
        path = path / checkpoint.BEST
    key = (str(path.resolve()), os.path.getmtime(path) if path.exists() else 0.0, str(device))
    if key in _CACHE:
        return _CACHE[key]
    payload = checkpoint.load(path, "cpu")
    cfg = saved_config(payload)
    facts = payload["data"]
    # The weights in the file replace any init, so pretrained sources must not be fetched again.
    model = build_model(
        with_overrides(cfg, {"pretrained": "", "freeze_stages": 0, "unfreeze_every": 0}),
        facts["num_classes"],
        facts["in_channels"],
    )
    model.load_state_dict(payload["model"])
    model.to(device).eval().requires_grad_(False)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (model, payload)
    return model, payload


def saved_config(payload: dict[str, Any]) -> TrainConfig:
    return with_overrides(TrainConfig(), payload["config"])
