"""Device and precision choice, in one place: the rest of the trainer asks here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainer.errors import ConfigError, NoFreeDevice

# `cuda:free` without `:K`: how many workers share each GPU (default 1).
WORKERS_PER_GPU_ENV = "HPO_WORKERS_PER_GPU"
MAX_SLOTS = 64


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
    `gpus` CUDA devices. `auto` and `cuda` give worker i cuda:i while there are GPUs enough, so
    4 workers on 4 GPUs use all four rather than four times cuda:0; more workers than GPUs
    share them by slots, each worker `cuda:free:K` with K = ceil(workers / gpus), so each claims
    a slot and its allocator holds at most 1/K of the GPU's memory (`claim_device`). With no
    GPU `auto` is the CPU. An explicit `cuda:N`, `cuda:free[:K]` or `cpu` is what every worker
    gets."""
    if name in ("auto", "cuda") and gpus > 0:
        if workers <= gpus:
            return [f"cuda:{i}" for i in range(workers)]
        return [f"cuda:free:{-(-workers // gpus)}"] * workers
    return [name] * workers


def local_devices(name: str, workers: int) -> list[str]:
    """`spread` over this machine's GPUs."""
    gpus = torch.cuda.device_count() if name in ("auto", "cuda") else 0
    return spread(name, workers, gpus)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware: AVX512-BF16 dot products or AMX-BF16
    tiles, what oneDNN's bf16 convolutions and matrix multiplies run on. Without them oneDNN
    converts to fp32 and back, and bf16 is slower than fp32. Read from CPUID (cpuinfo) by
    `torch.cpu.get_capabilities`, which says what the CPU has, where
    `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is True on any AVX-512 CPU, emulated or not.
    ARM's bf16 flags are not counted: no comparison has been run on such a CPU."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if get is None:
        return False
    caps = get()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_runtime(device_name: str, amp: str) -> Runtime:
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    if amp == "auto":
        # On a CPU, bf16 only where it is computed in hardware (`cpu_has_native_bf16`): there it
        # trained digits to fp32's accuracy over five seeds and resnet20 at 32 px 1.7x faster
        # (BENCHMARKS.md, "bf16 on the CPU"); elsewhere it is emulated, slower than fp32.
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
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


def free_slots(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """How many workers share each GPU under a `cuda:free` device name, or None for any other
    name. `cuda:free:K` says K; plain `cuda:free` takes $HPO_WORKERS_PER_GPU, else 1 (a GPU
    each). A K that is not a whole number from 1 to MAX_SLOTS is a ConfigError naming it."""
    if name == "cuda:free":
        text = (os.environ if environ is None else environ).get(WORKERS_PER_GPU_ENV, "").strip()
        where = f"{WORKERS_PER_GPU_ENV}={text!r}"
        text = text or "1"
    elif name.startswith("cuda:free:"):
        text = name.removeprefix("cuda:free:")
        where = f"device: {name!r}"
    else:
        return None
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_SLOTS):
        raise ConfigError(
            f"{where}: workers per GPU must be a whole number from 1 to {MAX_SLOTS}"
            " (cuda:free:4 puts four workers on each GPU)"
        )
    return int(text)


@dataclass(frozen=True)
class Slot:
    gpu: int
    slot: int  # 0 .. slots-1 on that GPU
    fd: int  # the open lock file: the claim lasts while it is open


def claim_free_slot(lock_dir: str, gpus: int, slots: int = 1) -> Slot:
    """Claim a (GPU, slot) that no live process holds, via an exclusive flock on its lock file in
    `lock_dir`. Slot 0 of every GPU comes before slot 1 of any, so N workers spread over the GPUs
    before any GPU takes a second. The kernel drops the lock when the process dies, even by
    SIGKILL, so a crashed worker's slot is free again at once. Containers on one host share the
    claim when `lock_dir` is a shared volume. Slot 0 is `gpu<N>.lock`, the one-worker-per-GPU
    file of before, so a worker of either kind sees the other's claim."""
    import fcntl

    os.makedirs(lock_dir, exist_ok=True)
    for slot in range(slots):
        for gpu in range(gpus):
            name = f"gpu{gpu}.lock" if slot == 0 else f"gpu{gpu}.slot{slot}.lock"
            fd = os.open(os.path.join(lock_dir, name), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return Slot(gpu, slot, fd)
    raise NoFreeDevice(
        f"device: all {gpus} GPU(s) x {slots} worker slot(s) are claimed by other workers"
        f" ({lock_dir})"
    )


def memory_fraction(slots: int) -> float:
    """The share of its GPU's memory a worker's allocator may hold when `slots` workers share
    it. The CUDA context (some hundreds of MB a process) lies outside this cap, so K workers
    can still exhaust a GPU near the cap; that is a CUDA OOM, which the step survives with
    smaller micro-batches (trainer/step.py)."""
    return 1.0 / slots


def limit_memory(fraction: float, gpu: int) -> None:
    """Cap this process's CUDA caching allocator on `gpu` at `fraction` of its memory: an
    allocation beyond it raises OutOfMemoryError here instead of starving a neighbour."""
    torch.cuda.set_per_process_memory_fraction(fraction, gpu)


def claim_device(
    name: str, lock_dir: str, *, gpus: int | None = None,
    limit: Callable[[float, int], None] = limit_memory,
) -> tuple[str, int | None]:
    """`cuda:free[:K]` claims a GPU slot no other worker on this host holds (K workers per GPU,
    each capped at 1/K of its memory by `limit`; K=1, the whole GPU, sets no cap); any other
    name passes through. `gpus` defaults to this machine's count (a test passes its own).
    Returns (device name, lock fd to keep open)."""
    slots = free_slots(name)
    if slots is None:
        return name, None
    if gpus is None:
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA device")
        gpus = torch.cuda.device_count()
    claim = claim_free_slot(lock_dir, gpus, slots)
    try:
        if slots > 1:
            limit(memory_fraction(slots), claim.gpu)
    except BaseException:
        os.close(claim.fd)
        raise
    return f"cuda:{claim.gpu}", claim.fd
