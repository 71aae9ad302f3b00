"""Device and precision choice, in one place: the rest of the trainer asks here."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from trainer.errors import ConfigError, NoFreeDevice


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
    head, _, index_text = name.partition(":")
    if name != "cpu" and not (head == "cuda" and (index_text == "" or index_text.isdigit())):
        raise ConfigError(f"device: {name!r} is not auto, cpu, cuda, cuda:N or cuda:free")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA device")
        index = int(index_text or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r} does not exist; this machine has"
                f" {torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(name)


def spread(name: str, workers: int, gpus: int) -> list[str]:
    """The device of each of `workers` local worker processes (`hpo run`) on a machine with
    `gpus` CUDA devices. `auto` and `cuda` go round the GPUs (worker i on cuda:i mod gpus), so
    4 workers on 4 GPUs use all four rather than four times cuda:0; with no GPU `auto` is the
    CPU. An explicit `cuda:N`, `cuda:free` or `cpu` is what every worker gets."""
    if name in ("auto", "cuda") and gpus > 0:
        return [f"cuda:{i % gpus}" for i in range(workers)]
    return [name] * workers


def local_devices(name: str, workers: int) -> list[str]:
    """`spread` over this machine's GPUs."""
    gpus = torch.cuda.device_count() if name in ("auto", "cuda") else 0
    return spread(name, workers, gpus)


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


def autocast(rt: Runtime) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision as `rt` chose it, for the forward passes of training and evaluation;
    a no-op context in full fp32."""
    if rt.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=rt.amp_dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: allocator peak on CUDA, process max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_memory(device: torch.device) -> None:
    """Give cached blocks back before a retry with smaller micro-batches. On CUDA the caching
    allocator keeps freed blocks until asked; on the CPU freed tensors go back at once, and a full
    gc pass (half a second with torch loaded, holding the GIL and so the heartbeat) buys nothing."""
    if device.type == "cuda":
        import gc

        gc.collect()  # tensors held only by reference cycles (tracebacks) die here
        torch.cuda.empty_cache()


def claim_free_index(lock_dir: str, count: int) -> tuple[int, int]:
    """Claim the lowest index in [0, count) that no live process holds, via an exclusive flock on
    `lock_dir/gpu<N>.lock`; returns (index, fd). The kernel drops the lock when the process dies,
    even by SIGKILL, so a crashed worker's GPU is free again at once. Containers on one host share
    the claim when `lock_dir` is a shared volume."""
    import fcntl
    import os

    os.makedirs(lock_dir, exist_ok=True)
    for index in range(count):
        fd = os.open(os.path.join(lock_dir, f"gpu{index}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return index, fd
    raise NoFreeDevice(f"device: all {count} GPU(s) are claimed by other workers ({lock_dir})")


def claim_device(name: str, lock_dir: str) -> tuple[str, int | None]:
    """`cuda:free` claims a GPU no other worker on this host uses (one worker per GPU without
    hand-editing); any other name passes through. Returns (device name, lock fd to keep open)."""
    if name != "cuda:free":
        return name, None
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda:free' asked for, but this machine has no CUDA device")
    index, fd = claim_free_index(lock_dir, torch.cuda.device_count())
    return f"cuda:{index}", fd
