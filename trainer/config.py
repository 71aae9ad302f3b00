"""`TrainConfig`: every knob of one training run, frozen, with its unit or reason.

A search trial's config is `dataclasses.replace(base, **params)` through `with_overrides`, which
rejects unknown keys and bad values instead of ignoring them: a typo in a space file must never
silently train the default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Any

from trainer.contract import METRIC_DIRECTIONS
from trainer.errors import ConfigError

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
MODELS = tuple(f"resnet{d}" for d in CIFAR_DEPTHS + IMAGENET_DEPTHS)
OPTIMIZERS = ("sgd", "nesterov", "adamw")
AMP_MODES = ("auto", "off", "bf16", "fp16")
CLASS_WEIGHTS = ("none", "balanced")
LOSSES = ("cross_entropy", "focal")
LOADERS = ("auto", "memory", "stream")


DATASETS = ("digits", "cifar10", "cifar100", "synthetic", "digits-hard", "synthetic-hard")


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    dataset: str = "digits"  # one of DATASETS, or imagefolder:<path>
    data_root: str = "data"  # folder holding CIFAR (torchvision layout)
    download: bool = False  # CIFAR only: fetch it into data_root if absent (never implicit)
    image_size: int = 0  # pixels per side; 0 = the dataset's own (digits 8, CIFAR 32, folder 64)
    split_seed: int = 0  # fixes which images are train/val/test, apart from the training seed
    val_fraction: float = 0.2  # of the non-test images, held out for validation
    test_fraction: float = 0.2  # carved from datasets without an official test split
    loader: str = "auto"  # memory: uint8 tensors on device; stream: DataLoader; auto: by size
    memory_limit_mb: int = 4096  # auto picks "stream" when the decoded train set exceeds this
    num_workers: int = 2  # DataLoader processes for the stream loader (persistent)
    crop_pad: int = -1  # pixels of zero padding for random crops; -1 = image_size // 8
    hflip: bool = True  # random horizontal flips (the digits dataset turns this off itself)
    jitter: float = 0.0  # brightness/contrast jitter strength, 0 = off

    # --- model ---
    model: str = "resnet20"  # resnet20/32/44/56/110 (CIFAR-style) or resnet18/34/50/101/152
    width: float = 1.0  # channel multiplier of the CIFAR-style nets (16/32/64 at 1.0)
    se: bool = False  # squeeze-and-excitation in every residual block
    se_reduction: int = 16  # SE bottleneck ratio
    dropout: float = 0.0  # probability, before the classifier
    small_stem: bool = True  # torchvision nets: 3x3 stride-1 stem, no max-pool (for <= 64 px)
    pretrained: str = ""  # "" | path to a state dict | "torchvision:<WEIGHTS>" e.g. IMAGENET1K_V2
    freeze_stages: int = 0  # first k of (stem, stage1..stage4) kept fixed, BN stats included
    # Gradual unfreezing: every this many epochs the deepest still-frozen stage trains again
    # (stage k-1 first, the stem last); 0 = the first freeze_stages stay frozen throughout.
    unfreeze_every: int = 0
    backbone_lr_mult: float = 1.0  # learning rate of everything but the head, as a fraction

    # --- optimisation ---
    epochs: int = 10
    batch_size: int = 128  # images per optimizer step (the effective batch)
    accum_steps: int = 1  # micro-batches per step; the effective batch stays batch_size
    optimizer: str = "sgd"  # sgd | nesterov | adamw
    lr: float = 0.1  # peak learning rate (per 256 images when lr_per_256)
    lr_per_256: bool = False  # linear scaling: peak = lr * batch_size / 256
    warmup_epochs: float = 1.0  # linear warm-up from 0, in epochs (fractions allowed)
    lr_floor: float = 0.0  # cosine decays to lr_floor * peak
    momentum: float = 0.9  # SGD momentum, or AdamW beta1
    weight_decay: float = 5e-4  # decoupled for AdamW; never applied to norms and biases
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none | balanced (inverse class frequency of the train split)
    # cross_entropy | focal: -sum_c w_c q_c (1 - p_c)^gamma log p_c over the smoothed target q
    # and class weights w (losses.focal_loss); gamma = 0 is cross entropy.
    loss: str = "cross_entropy"
    focal_gamma: float = 2.0  # focal's exponent; read only when loss = focal
    grad_clip: float = 0.0  # max global gradient norm, 0 = off
    # The epoch whose weights are kept (best.pt, the test metrics, Result's val_*): the best by
    # this validation metric, in its direction (contract.METRIC_DIRECTIONS); a tie keeps the
    # earlier epoch. A search sets it to its own metric, so the weights it keeps are the ones
    # its objective scored.
    best_metric: str = "val_acc"  # val_acc | val_top5 | val_loss
    # Early stopping, in epochs: the run ends once this many epochs in a row did not beat the
    # best by best_metric (the best epoch's weights are kept, as at a normal end); 0 = off.
    early_stop_patience: int = 0
    # Nor before this many epochs have been trained: on a cosine schedule a good run's first
    # epochs can be flat or noisy (BENCHMARKS.md, early stopping), like the pruner's warm-up.
    early_stop_min_epochs: int = 0

    # --- distillation ---
    teacher: str = ""  # path to a checkpoint written by this trainer (best.pt), "" = off
    kd_temperature: float = 4.0  # softmax temperature T; the KL term is scaled by T^2
    kd_alpha: float = 0.0  # weight of the KL term; the hard loss gets 1 - kd_alpha

    # --- runtime ---
    seed: int = 0  # model init, splits, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N (workers also take cuda:free)
    # auto | off | bf16 | fp16. auto: bf16 on CUDA (fp16 where it has none) and on CPUs that
    # compute bf16 in hardware (AVX512-BF16, AMX), else off (trainer/device.py).
    amp: str = "auto"
    # torch.compile the training forward (inductor); compiled once per architecture in a
    # process, the time of that first step recorded apart as compile_seconds.
    compile: bool = False
    eval_batch_size: int = 512
    checkpoint_dir: str = ""  # last.pt (to resume) and best.pt (the weights kept); "" = none
    # The most training time a crash can lose, in seconds: epoch checkpoints go to disk once this
    # long has passed since the last write, after the last epoch, and on a stop (then nothing is
    # lost); 0 writes every epoch. Writing a small model takes longer than an epoch on small data.
    checkpoint_seconds: float = 30.0
    resume: bool = True  # continue from checkpoint_dir/last.pt when it is there
    fault: str = ""  # testing aid: "oom>N" fails micro-batches above N; "nan@S" NaN at step S
    # Evaluate the test split at the end. A search turns it off: its trials record validation
    # metrics only, and the test split is evaluated once, for the winner.
    test: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = frozenset(f.name for f in fields(TrainConfig))
_HINTS: dict[str, type] = typing.get_type_hints(TrainConfig)
_CHOICES: dict[str, tuple[str, ...]] = {
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "amp": AMP_MODES,
    "class_weights": CLASS_WEIGHTS,
    "loss": LOSSES,
    "loader": LOADERS,
    "best_metric": tuple(METRIC_DIRECTIONS),
}
# (low, high, low inclusive, high inclusive) for numeric fields that have a legal range.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "image_size": (0, 4096, True, True),
    "val_fraction": (0.0, 1.0, False, False),
    "test_fraction": (0.0, 1.0, True, False),
    "memory_limit_mb": (0, math.inf, True, False),
    "num_workers": (0, 64, True, True),
    "crop_pad": (-1, 256, True, True),
    "jitter": (0.0, 1.0, True, True),
    "width": (0.0, 16.0, False, True),
    "se_reduction": (1, 1024, True, True),
    "dropout": (0.0, 1.0, True, False),
    "freeze_stages": (0, 5, True, True),
    "unfreeze_every": (0, 100_000, True, True),
    "backbone_lr_mult": (0.0, math.inf, True, False),
    "epochs": (1, 100_000, True, True),
    "batch_size": (1, 1 << 20, True, True),
    "accum_steps": (1, 1 << 16, True, True),
    "lr": (0.0, math.inf, False, False),
    "warmup_epochs": (0.0, math.inf, True, False),
    "lr_floor": (0.0, 1.0, True, True),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "label_smoothing": (0.0, 1.0, True, False),
    "focal_gamma": (0.0, math.inf, True, False),
    "grad_clip": (0.0, math.inf, True, False),
    "early_stop_patience": (0, 100_000, True, True),
    "early_stop_min_epochs": (0, 100_000, True, True),
    "kd_temperature": (0.0, math.inf, False, False),
    "kd_alpha": (0.0, 1.0, True, True),
    "eval_batch_size": (1, 1 << 20, True, True),
    "checkpoint_seconds": (0.0, math.inf, True, False),
}


def field_type(name: str) -> type:
    """The Python type of a field: bool, int, float or str."""
    return _HINTS[name]


def coerce(name: str, value: Any) -> Any:
    """Check one field's value and return it in the field's type, or raise ConfigError."""
    if name not in FIELD_NAMES:
        raise ConfigError(f"unknown field {name!r}; known fields: {', '.join(sorted(FIELD_NAMES))}")
    kind = field_type(name)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    _check_value(name, value)
    return value


def _check_value(name: str, value: Any) -> None:
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[name])}")
    if name in _RANGES:
        low, high, low_in, high_in = _RANGES[name]
        ok_low = value >= low if low_in else value > low
        ok_high = value <= high if high_in else value < high
        if not (ok_low and ok_high):
            lo = "[" if low_in else "("
            hi = "]" if high_in else ")"
            raise ConfigError(f"{name}: {value!r} is outside {lo}{low}, {high}{hi}")
    if name == "dataset":
        ok = value in DATASETS or (
            value.startswith("imagefolder:") and len(value) > len("imagefolder:")
        )
        if not ok:
            raise ConfigError(
                f"dataset: {value!r} is not {', '.join(DATASETS)} or imagefolder:<path>"
            )
    if name == "device" and not (value in ("auto", "cpu", "cuda") or _is_cuda_index(value)):
        raise ConfigError(f"device: {value!r} is not auto, cpu, cuda or cuda:N")
    if name == "fault" and value and not _parse_fault(value):
        raise ConfigError(f"fault: {value!r} is not 'oom>N' or 'nan@S'")


def _is_cuda_index(value: str) -> bool:
    head, _, index = value.partition(":")
    return head == "cuda" and index.isdigit()


def _parse_fault(value: str) -> tuple[str, int] | None:
    for kind, sep in (("oom", ">"), ("nan", "@")):
        if value.startswith(kind + sep) and value[len(kind) + 1 :].isdigit():
            return kind, int(value[len(kind) + 1 :])
    return None


def fault_of(cfg: TrainConfig) -> tuple[str, int] | None:
    """The injected fault as (kind, number), or None."""
    return _parse_fault(cfg.fault) if cfg.fault else None


def with_overrides(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """`base` with `overrides` applied, each key and value checked; unknown keys are errors."""
    checked = {name: coerce(name, value) for name, value in overrides.items()}
    cfg = dataclasses.replace(base, **checked)
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Checks that span fields; single fields are checked by `coerce`."""
    for f in fields(cfg):
        coerce(f.name, getattr(cfg, f.name))
    if cfg.batch_size % cfg.accum_steps:
        raise ConfigError(
            f"accum_steps: {cfg.accum_steps} does not divide batch_size {cfg.batch_size}"
        )
    if cfg.model.removeprefix("resnet").isdigit():
        depth = int(cfg.model.removeprefix("resnet"))
        if depth in CIFAR_DEPTHS and cfg.pretrained.startswith("torchvision:"):
            raise ConfigError(
                f"pretrained: torchvision weights exist only for resnet18/34/50/101/152,"
                f" not {cfg.model}"
            )
    if cfg.unfreeze_every > 0 and cfg.freeze_stages == 0:
        raise ConfigError(
            f"unfreeze_every: {cfg.unfreeze_every} unfreezes frozen stages, but freeze_stages is 0;"
            " set freeze_stages > 0, or unfreeze_every = 0"
        )
    if cfg.kd_alpha > 0 and not cfg.teacher:
        raise ConfigError("kd_alpha: distillation needs a teacher checkpoint (teacher = ...)")
