"""`torch.compile` for the training forward pass, compiled once per architecture in a process.

Compiling costs tens of seconds (inductor generates and builds C++ or Triton kernels), and a
persistent worker trains many trials of few architectures. So the compiled module is cached per
architecture key, as `data.py` caches datasets: a later trial of the same architecture copies its
freshly initialised (or pretrained, or resumed) weights into the cached module in place, and the
compiled graphs apply as they are: same module, same parameter tensors, so Dynamo's guards pass
and nothing is traced again.

Only the training forward is compiled. Evaluation runs the same module eagerly: BatchNorm in eval
mode under `inference_mode` is a graph of its own to compile, for a few percent of a trial's time.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from trainer.device import Runtime
from trainer.models import FROZEN_ATTR

BACKEND = "inductor"
_CACHE_SIZE = 2  # architectures kept per process; each holds its model's weights on the device
# Graphs Dynamo keeps per model class (its forward's code object is one for every width and SE
# setting) before it gives up and runs that class eagerly; its default of 8 is a search's first
# eight architectures. Evicted entries' graphs stay compiled, counting towards it.
RECOMPILE_LIMIT = 64


@dataclass
class Compiled:
    """One architecture's module and its compiled forward."""

    key: str
    model: nn.Module  # the eager module a trial trains, evaluates and saves
    forward: nn.Module  # torch.compile(model): the same parameters
    # (input shape, micro-batch, frozen stages) it has run: a new one makes Dynamo compile again.
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    trials: int = 0  # trials that have used it, this one included

    def first_run(self, shape: tuple[int, ...]) -> bool:
        """Whether a step of this input shape is new to the compiled module (it compiles)."""
        new = shape not in self.shapes
        self.shapes.add(shape)
        return new


_cache: OrderedDict[str, Compiled] = OrderedDict()
_lock = threading.Lock()


def architecture_key(model: nn.Module, rt: Runtime) -> str:
    """What a compiled graph depends on besides the weights' values: the module tree with every
    layer's settings (its repr: sizes, strides, dropout rates, the classes), which parameters
    train, the frozen stages (kept in eval mode), the device, memory format and autocast dtype."""
    trainable = "".join("1" if p.requires_grad else "0" for p in model.parameters())
    parts = [repr(model), trainable, str(getattr(model, FROZEN_ATTR, 0)), str(rt.device),
             str(rt.channels_last), str(rt.amp_dtype)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def compiled_for(model: nn.Module, rt: Runtime) -> tuple[Compiled, bool]:
    """The compiled module for `model`'s architecture, holding `model`'s weights and buffers,
    and whether it was compiled just now. `model` itself is used when it is new; otherwise its
    state is copied into the cached module and it may be dropped: train the returned `.model`."""
    key = architecture_key(model, rt)
    with _lock:
        entry = _cache.get(key)
        fresh = entry is None
        if entry is None:
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            # An nn.Module at run time (OptimizedModule); typed as any callable.
            forward = cast(nn.Module, torch.compile(model, backend=BACKEND))
            entry = Compiled(key, model, forward)
            _cache[key] = entry
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
            with torch.no_grad():
                entry.model.load_state_dict(model.state_dict())
            for p in entry.model.parameters():
                p.grad = None  # the last trial's gradients: memory, and never to be summed into
        entry.trials += 1
        return entry, fresh


def clear_cache() -> None:
    """Forget every compiled module (and let torch forget their graphs)."""
    with _lock:
        _cache.clear()
    torch.compiler.reset()
