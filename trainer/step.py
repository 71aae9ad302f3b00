"""One optimizer step, split into micro-batches, that falls back to smaller ones on OOM.

The effective batch never changes: each micro-batch's loss is weighted by its share of the batch
(its images' share for the distillation term; its class weights' share for the hard-label loss,
cross entropy or focal, which a weighted mean normalises by total weight, not image count), and
the gradients summed, so a step on 4 x 32 images equals a step on 128 images up to float rounding
and BatchNorm's per-micro-batch statistics.

No step waits for the device: the loss stays there, and so does the record of the first step
whose loss was not finite. The host reads that record (one sync) only in `check_finite`, which
the loop calls every `FINITE_CHECK_STEPS` steps and at each epoch's last step.

Each step also measures the global L2 norm of the gradient it applies (of the accumulated
micro-batches, unscaled, before clipping: what `grad_clip` compares with), summed and maxed on
the device; `take_grad_norms` reads them once per epoch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.config import TrainConfig, fault_of
from trainer.device import Runtime, autocast, release_memory
from trainer.errors import Diverged, OutOfMemory
from trainer.losses import hard_loss, soft_loss

# How often the host looks for a non-finite loss. Reading a device value waits for every queued
# kernel, so a read per step leaves the GPU idle while the next step is launched; one read in 16
# steps keeps the queue full, and a divergence costs at most 15 wasted steps (whose NaN weights
# are never evaluated, reported or checkpointed).
FINITE_CHECK_STEPS = 16


class StepRunner:
    def __init__(
        self,
        cfg: TrainConfig,
        rt: Runtime,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        teacher: nn.Module | None,
        class_weight: Tensor | None,
    ) -> None:
        self.cfg, self.rt, self.model, self.optimizer = cfg, rt, model, optimizer
        self.scaler, self.teacher, self.class_weight = scaler, teacher, class_weight
        self.micro_batch = cfg.batch_size // cfg.accum_steps  # shrinks for good after an OOM
        self.fault = fault_of(cfg)
        # Focal loss replaces the hard-label term only; distillation's soft term is unchanged.
        self.focal_gamma = cfg.focal_gamma if cfg.loss == "focal" else None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # The first non-finite loss and its (epoch, step), on the device; step -1: none yet.
        device = rt.device
        self._bad_epoch = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_loss = torch.zeros((), device=device)
        # Gradient norms since the last `take_grad_norms`: sum, max and count of the finite ones.
        self._norm_stats = torch.zeros(3, device=device)

    def step(self, x: Tensor, y: Tensor, *, epoch: int, step: int) -> Tensor:
        """Train on one batch; returns its mean loss, a device tensor not yet read by the host.
        A non-finite loss is recorded for `check_finite`; its update is still applied (with
        NaN gradients: the run is over at the next check)."""
        while True:
            try:
                loss = self._accumulate(x, y, step)
                break
            except Exception as e:
                if not is_oom(e):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                detail = str(e).splitlines()[0] if str(e) else type(e).__name__
                del e  # the traceback pins the activations of the failed attempt
                release_memory(self.rt.device)
                if self.micro_batch == 1:
                    raise OutOfMemory(self.cfg.batch_size, detail) from None
                self.micro_batch = max(1, self.micro_batch // 2)
        first = torch.logical_and(self._bad_step < 0, ~torch.isfinite(loss))
        self._bad_epoch = torch.where(first, epoch, self._bad_epoch)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)
        # Unscaled first (a no-op without fp16 loss scaling): the norm is of the true gradient.
        # GradScaler.step then skips its own unscale, and the fused step keeps its inf check.
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:  # the clip computes the norm anyway, and returns it pre-clip
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params
                                                  if p.grad is not None])
        self._record_norm(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    def check_finite(self) -> None:
        """Raise `Diverged` for the first step since the run began whose loss was NaN or
        infinite. Waits for the device: call it every FINITE_CHECK_STEPS steps, not each step."""
        step = int(self._bad_step)
        if step >= 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged(int(self._bad_epoch), step, float(self._bad_loss))

    def take_grad_norms(self) -> tuple[float | None, float | None]:
        """(mean, max) of the steps' gradient norms since the last call, and a fresh start; one
        read of the device. Steps whose gradient was not finite are left out: under fp16 loss
        scaling they are the overflows GradScaler skips; otherwise the loss diverged, which
        `check_finite` reports. (None, None) when no step had a finite gradient."""
        total, peak, count = self._norm_stats.tolist()
        self._norm_stats.zero_()
        return (total / count, peak) if count else (None, None)

    def _record_norm(self, norm: Tensor) -> None:
        norm = norm.detach().float().to(self._norm_stats.device)
        finite = torch.isfinite(norm)
        value = torch.where(finite, norm, torch.zeros_like(norm))
        stats = self._norm_stats  # updated in place on the device: no step waits for the host
        stats[0] += value
        stats[1] = torch.maximum(stats[1], value)
        stats[2] += finite.float()

    def _accumulate(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """Backward of `kd_loss` over the whole batch, one micro-batch at a time; returns it."""
        self.optimizer.zero_grad(set_to_none=True)
        total = len(y)
        alpha = self.cfg.kd_alpha if self.teacher is not None else 0.0
        weight = self.class_weight
        weight_total = weight[y].sum() if weight is not None else None
        loss_sum = torch.zeros((), device=x.device)
        for start in range(0, total, self.micro_batch):
            xb, yb = x[start : start + self.micro_batch], y[start : start + self.micro_batch]
            self._inject(len(yb))
            with autocast(self.rt):
                logits = self.model(xb)
                teacher_logits = None
                if self.teacher is not None and alpha > 0:
                    with torch.no_grad():
                        teacher_logits = self.teacher(xb)
            share = len(yb) / total
            hard_share = (share if weight is None or weight_total is None
                          else weight[yb].sum() / weight_total)
            hard = hard_loss(logits, yb, label_smoothing=self.cfg.label_smoothing, weight=weight,
                             focal_gamma=self.focal_gamma)
            loss = (1.0 - alpha) * hard_share * hard
            if teacher_logits is not None:
                soft = soft_loss(logits, teacher_logits, temperature=self.cfg.kd_temperature)
                loss = loss + alpha * share * soft
            if self.fault == ("nan", step):
                loss = loss * float("nan")
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def _inject(self, micro: int) -> None:
        if self.fault is not None and self.fault[0] == "oom" and micro > self.fault[1]:
            raise torch.OutOfMemoryError(f"injected: micro-batch of {micro} > {self.fault[1]}")


def is_oom(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
