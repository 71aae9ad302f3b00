"""Optimizer construction: parameter groups without decay on norms/biases, and a slower backbone."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ConfigError, TrainConfig
from trainer.models import is_head


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, *, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD (momentum or Nesterov) or AdamW over up to four groups: {backbone, head} x {decay, not}.

    Each group carries `lr_mult`; `set_lr` multiplies the scheduled rate by it. Frozen parameters
    are left out entirely so they cannot move through weight decay or momentum, unless
    `cfg.unfreeze_every` thaws them later: then they sit in their groups from the start (so the
    groups, and a checkpoint's optimizer state, are the same at every epoch) and stay put while
    frozen because their gradient is None, which torch's optimizers skip: no decay, no momentum,
    no state until their first gradient.

    `fused` (the trainer sets it on CUDA): one fused kernel per step, which also takes fp16 loss
    scaling's inf check on the device. Unfused, `GradScaler.step` reads that check on the host
    (`found_inf.item()`): a synchronisation every step.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not cfg.unfreeze_every:
            continue
        # 1-d tensors are norm scales/shifts and biases: decaying them only fights the norm.
        decays = param.ndim > 1
        groups.setdefault((is_head(name), decays), []).append(param)
    param_groups = [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decays else 0.0,
            "lr_mult": 1.0 if head else cfg.backbone_lr_mult,
            "lr": 0.0,
        }
        for (head, decays), params in sorted(groups.items())
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=0.0, betas=(cfg.momentum, 0.999),
                                 fused=fused or None)
    if cfg.optimizer == "nesterov" and cfg.momentum == 0:
        # torch would raise a bare ValueError mid-setup; this is the user's config to fix.
        raise ConfigError("momentum: nesterov needs momentum > 0; use optimizer = sgd for none")
    return torch.optim.SGD(
        param_groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov",
        fused=fused or None,
    )


def keep_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After `load_state_dict`: the groups' `fused` as this run built them. A checkpoint's groups
    carry the flag of the device that wrote it, and a fused flag that disagrees with the
    optimizer's construction would let GradScaler hand the unscaling to a step that skips it."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
