"""Pretrained backbone weights: read them safely, check they fit, copy them in.

A source is a local file (a state dict, or a checkpoint holding one under "model") or
`torchvision:<WEIGHTS>` from torchvision's registry. Files are read with `weights_only=True`:
a checkpoint is data, and a crafted pickle must never run code here.

Fitting is strict, because a silently half-loaded backbone trains and looks plausible: every key
must match the model in name and shape, except
- the head (the caller's `is_head`), which is always new, sized for this task;
- the stem conv `conv1.weight` when only its input channels or kernel differ: a grey-scale stem
  with the same kernel gets the sum of the RGB kernels, any other stem stays fresh;
- squeeze-excitation modules, which start fresh when the file has none (a plain backbone);
- BatchNorm `num_batches_tracked`, which torchvision's older weight files lack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import SqueezeExcitation

from trainer.config import IMAGENET_DEPTHS, ConfigError

log = logging.getLogger(__name__)

STEM_KEY = "conv1.weight"
TORCHVISION_PREFIX = "torchvision:"
# Prefixes that wrappers add to every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 5  # offending keys named in an error; the rest are counted


@dataclass
class LoadReport:
    loaded: int = 0  # tensors copied from the source
    adapted: list[str] = field(default_factory=list)  # copied after a change of shape
    fresh: list[str] = field(default_factory=list)  # kept at their new initialisation


def read_source(source: str, model_name: str) -> dict[str, Tensor]:
    """The state dict that `source` names, on the CPU; a ConfigError says what is wrong."""
    if source.startswith(TORCHVISION_PREFIX):
        return _read_torchvision(source.removeprefix(TORCHVISION_PREFIX), model_name)
    return read_file(source)


def read_file(path: str) -> dict[str, Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"pretrained: no file {path!r}; give the path of a saved state dict or checkpoint"
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the file is the only cause, whatever torch raises for it
        raise ConfigError(
            f"pretrained: {path!r} cannot be read as plain weights (only tensors and plain"
            f" containers are accepted, never arbitrary pickled objects): {err}"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ConfigError(
            f"pretrained: {path!r} holds a {type(obj).__name__}, not a state dict"
            " (a mapping of names to tensors, or a checkpoint with one under 'model')"
        )
    return dict(obj)


def _read_torchvision(name: str, model_name: str) -> dict[str, Tensor]:
    if model_name not in {f"resnet{d}" for d in IMAGENET_DEPTHS}:
        raise ConfigError(
            f"pretrained: torchvision weights exist only for resnet18/34/50/101/152,"
            f" not {model_name}"
        )
    registry = torchvision.models.get_model_weights(model_name)
    names = [*registry.__members__]
    if name not in names:
        raise ConfigError(
            f"pretrained: torchvision has no weights {name!r} for {model_name};"
            f" choose one of {', '.join(names)}"
        )
    weights = registry[name]
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ConfigError(
            f"pretrained: could not fetch {TORCHVISION_PREFIX}{name} ({weights.url}): {err}."
            " This needs internet access; offline, download the file elsewhere and set"
            " pretrained to its local path"
        ) from err
    return dict(state)


def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    is_head: Callable[[str], bool],
) -> LoadReport:
    """Copy `state` into `model` under the rules in this module's docstring, or change nothing
    and raise ConfigError naming `source` and the first offending keys."""
    state = {_unwrap(k): v for k, v in state.items() if not is_head(_unwrap(k))}
    own = model.state_dict()
    optional = _optional_keys(model, own, state)
    report = LoadReport()
    take: dict[str, Tensor] = {}
    problems: list[str] = []
    for key, tensor in state.items():
        if key not in own:
            problems.append(f"{key} is in the file but not in the model")
        elif tensor.shape == own[key].shape:
            take[key] = tensor
        elif key == STEM_KEY and _same_stem_outputs(tensor, own[key]):
            adapted = _adapt_stem(tensor, own[key])
            if adapted is None:
                report.fresh.append(key)
            else:
                take[key] = adapted
                report.adapted.append(key)
        else:
            problems.append(
                f"{key} has shape {tuple(tensor.shape)} in the file"
                f" but {tuple(own[key].shape)} in the model"
            )
    for key in own:
        if key not in state and not is_head(key):
            if key in optional:
                report.fresh.append(key)
            else:
                problems.append(f"{key} is in the model but not in the file")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise ConfigError(
            f"pretrained: {source!r} does not fit this model: "
            + "; ".join(problems[:MAX_LISTED])
            + more
            + ". It must come from the same architecture (model, width, se)."
        )
    own.update(take)
    model.load_state_dict(own)
    report.loaded = len(take)
    return report


def _unwrap(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _optional_keys(model: nn.Module, own: Mapping[str, Any], state: Mapping[str, Any]) -> set[str]:
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    se_prefixes = tuple(
        name + "." for name, m in model.named_modules() if isinstance(m, SqueezeExcitation)
    )
    if se_prefixes and not any(k.startswith(se_prefixes) for k in state):
        optional |= {k for k in own if k.startswith(se_prefixes)}
    return optional


def _same_stem_outputs(theirs: Tensor, ours: Tensor) -> bool:
    return theirs.ndim == ours.ndim == 4 and theirs.shape[0] == ours.shape[0]


def _adapt_stem(theirs: Tensor, ours: Tensor) -> Tensor | None:
    """RGB kernels summed for a grey-scale stem of the same kernel size; None: keep ours."""
    if theirs.shape[2:] == ours.shape[2:] and theirs.shape[1] == 3 and ours.shape[1] == 1:
        # A grey image fed to the RGB stem as three equal channels gives the same response.
        return theirs.sum(dim=1, keepdim=True)
    return None
