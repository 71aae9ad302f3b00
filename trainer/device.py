"""Device and precision choice, in one place: the rest of the trainer asks here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    use_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    channels_last: bool  # NHWC is faster for convolutions on tensor-core GPUs only


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA device")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r} does not exist; this machine has"
                f" {torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(name)


def resolve_runtime(device_name: str, amp: str) -> Runtime:
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    if amp == "auto":
        # CPU autocast only pays on CPUs with bf16 matrix units; fp32 is the safe default there.
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return Runtime(
        device=device,
        amp_dtype=dtype,
        use_scaler=dtype is torch.float16,
        channels_last=cuda,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: allocator peak on CUDA, process max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_memory(device: torch.device) -> None:
    """Give cached blocks back before a retry with smaller micro-batches."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
