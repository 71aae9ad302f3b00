"""`train(cfg, report) -> Result`: one training run, top to bottom.

Every source of randomness (shuffling, augmentation, dropout) is reseeded from (seed, epoch) at the
start of each epoch, so a run resumed from an epoch checkpoint replays exactly what an
uninterrupted run would have done, without carrying generator states around.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint
from trainer.augment import mean_std_tensors, resolve_pad, train_transform
from trainer.compiled import Compiled, compiled_for
from trainer.config import ConfigError, TrainConfig, check
from trainer.contract import Progress, Report, Result, is_better, stops_early
from trainer.data import ImageData, load_data
from trainer.device import peak_memory_mb, resolve_runtime
from trainer.errors import Interrupted
from trainer.evaluate import as_test_metrics, evaluate
from trainer.losses import balanced_weights
from trainer.models import build_model, freeze, frozen_at, train_mode
from trainer.optim import keep_fused, make_optimizer, set_lr
from trainer.saved_model import load_model
from trainer.schedule import lr_at, peak_lr
from trainer.step import FINITE_CHECK_STEPS, StepRunner

# Fields that may differ between a run and the checkpoint it resumes: they change where or how
# fast the run happens, not what it computes.
_RESUMABLE_DIFFERENCES = frozenset(
    {"device", "checkpoint_dir", "resume", "num_workers", "eval_batch_size", "fault", "download",
     "checkpoint_seconds", "test", "compile"}
)


def train(
    cfg: TrainConfig,
    report: Report | None = None,
    *,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> Result:
    """Train one model. `report(epoch, metrics)` is called after each epoch's checkpoint (epochs
    count from 1; see `EpochCheckpoints` for when it reaches the disk) and may raise to end the
    run (`Interrupted` first writes the epoch); `stop` ends it at the next step with `Interrupted`.
    Raises `Diverged`, `OutOfMemory`, `Interrupted`, or `ConfigError` for a bad config or data.
    """
    check(cfg)
    rt = resolve_runtime(cfg.device, cfg.amp)
    data = load_data(cfg, rt.device)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    resume_from = ckpt_dir / checkpoint.LAST if ckpt_dir and cfg.resume else None
    if resume_from is not None and not resume_from.exists():
        resume_from = None
    torch.manual_seed(cfg.seed)
    # A resumed run takes every weight from its checkpoint: reading the pretrained source again
    # would be wasted, or impossible when it was a download or a file since removed.
    build_cfg = dataclasses.replace(cfg, pretrained="") if resume_from else cfg
    model = build_model(build_cfg, data.num_classes, data.in_channels).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled: Compiled | None = None
    forward: nn.Module = model  # what the training step calls; evaluation calls `model`
    if cfg.compile:
        compiled = compiled_for(model, rt)[0]
        model, forward = compiled.model, compiled.forward
    fused = rt.device.type == "cuda"  # no host sync per step for fp16's inf check (optim.py)
    optimizer = make_optimizer(model, cfg, fused=fused)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    teacher = _load_teacher(cfg, data, rt.device) if cfg.kd_alpha > 0 else None
    weight = balanced_weights(data.class_counts()).to(rt.device) if (
        cfg.class_weights == "balanced"
    ) else None
    runner = StepRunner(cfg, rt, forward, optimizer, scaler, teacher, weight)
    mean, std = mean_std_tensors(data.mean, data.std, rt.device)

    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_per_256)
    pad = resolve_pad(cfg.crop_pad, data.image_size)
    facts = _data_facts(data)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    ckpts = checkpoint.EpochCheckpoints(ckpt_dir, cfg.checkpoint_seconds)
    start_epoch = 0
    if resume_from is not None and ckpt_dir is not None:
        state = checkpoint.load(resume_from, rt.device)
        _check_resumable(cfg, state["config"], ckpt_dir)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        keep_fused(optimizer, fused)
        if state["scaler"]:  # empty when saved without loss scaling, e.g. on another device
            scaler.load_state_dict(state["scaler"])
        runner.micro_batch = state["micro_batch"]
        history, best, start_epoch = state["history"], state["best"], state["epoch"]

    # Early stopping ends the loop after the epoch that spent the patience. A run resumed from
    # that epoch's checkpoint (stopped after it, before it returned) trains no further.
    stopped = start_epoch if best is not None and stops_early(
        cfg.early_stop_patience, start_epoch, best["epoch"], cfg.epochs,
        cfg.early_stop_min_epochs) else None
    images, train_seconds, compile_seconds = 0, 0.0, 0.0
    for epoch in range(start_epoch, cfg.epochs if stopped is None else start_epoch):
        shuffle, augment_gen = _seed_epoch(cfg.seed, epoch, rt.device)
        # Gradual unfreezing follows the epoch alone (resumed runs included). Set every epoch,
        # also without it: a cached compiled module may come thawed from an earlier trial.
        frozen = frozen_at(epoch, cfg.freeze_stages, cfg.unfreeze_every)
        freeze(model, frozen)
        train_mode(model)
        loss_sum = torch.zeros((), device=rt.device)
        seen = 0
        epoch_compile = 0.0  # seconds of this epoch's steps that compiled (see below)
        started = time.perf_counter()
        for i, (x, y) in enumerate(data.train_batches(cfg.batch_size, shuffle)):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps, peak=peak,
                       floor=cfg.lr_floor * peak)
            set_lr(optimizer, lr)
            inputs = train_transform(
                x, pad=pad, flip=cfg.hflip and data.flip_safe,
                jitter=cfg.jitter, mean=mean, std=std, generator=augment_gen,
            )
            if rt.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            # A step whose input shape is new to the compiled module compiles (the first step of
            # a new architecture, a new batch or micro-batch size): timed apart, with a device
            # sync before and after, so compile time never reads as training throughput.
            # Thawing a stage changes what Dynamo guards on (requires_grad, BN mode): it compiles.
            compiling = compiled is not None and compiled.first_run(
                (*inputs.shape, runner.micro_batch, frozen))
            step_started = _synced_clock(rt.device) if compiling else 0.0
            loss_sum += runner.step(inputs, y, epoch=epoch + 1, step=step) * len(y)
            if compiling:
                epoch_compile += _synced_clock(rt.device) - step_started
            seen += len(y)
            # Diverged before the epoch can be evaluated, reported or checkpointed.
            if (step + 1) % FINITE_CHECK_STEPS == 0 or i + 1 == steps_per_epoch:
                runner.check_finite()
            if stop is not None and stop.is_set():
                runner.check_finite()  # a diverged run is not handed back to be resumed
                # `epoch` epochs are complete, but only a checkpoint_dir holds them.
                ckpts.flush()
                raise Interrupted(epoch if ckpt_dir else 0)
            if progress is not None:
                progress(epoch + 1, i + 1, steps_per_epoch)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        epoch_seconds = time.perf_counter() - started - epoch_compile
        images += seen
        train_seconds += epoch_seconds
        compile_seconds += epoch_compile
        val = evaluate(model, data, "val", rt, batch_size=cfg.eval_batch_size, mean=mean, std=std)
        grad_mean, grad_max = runner.take_grad_norms()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / max(seen, 1),
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_top5": val["top5"],
            # The scheduled rate of the epoch's last step, before any group's lr_mult: reading it
            # back from a group would divide by zero when backbone_lr_mult is 0.
            "lr": lr,
            "images_per_sec": seen / max(epoch_seconds, 1e-9),
            "epoch_seconds": epoch_seconds,
            "compile_seconds": epoch_compile,
            "peak_memory_mb": peak_memory_mb(rt.device),
            "micro_batch": runner.micro_batch,
            "frozen_stages": frozen,
            # Global L2 norm of each step's gradient, unscaled and before clipping (step.py).
            "grad_norm_mean": grad_mean,
            "grad_norm_max": grad_max,
        }
        history.append(metrics)
        key = cfg.best_metric
        improved = best is None or is_better(key, metrics[key], best[key])
        if improved:
            best = metrics
        assert best is not None
        # Recorded on the epoch, so a caller (a search's pruner) knows it is the run's last.
        metrics["early_stop"] = stops_early(cfg.early_stop_patience, epoch + 1, best["epoch"],
                                            cfg.epochs, cfg.early_stop_min_epochs)
        ckpts.epoch({
            "config": cfg.to_dict(), "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "micro_batch": runner.micro_batch, "history": history, "best": best, "data": facts,
        }, {
            "config": cfg.to_dict(), "epoch": epoch + 1, "model": model.state_dict(),
            "metrics": metrics, "data": facts,
        } if improved else None, final=epoch + 1 == cfg.epochs or metrics["early_stop"])
        if report is not None:
            try:
                report(epoch + 1, metrics)
            except Interrupted:
                ckpts.flush()  # the trial is handed back: it resumes from this epoch
                raise
        if metrics["early_stop"]:
            stopped = epoch + 1
            break

    assert best is not None  # epochs >= 1 is enforced by check()
    if ckpts.best_model is not None:
        model.load_state_dict(ckpts.best_model)
    elif ckpt_dir:  # resumed, and no epoch since beat the best one before the interruption
        model.load_state_dict(checkpoint.load(ckpt_dir / checkpoint.BEST, rt.device)["model"])
    tested = dict.fromkeys(("test_acc", "test_top5", "test_loss", "test_macro_f1", "test_f1",
                            "confusion"))
    if cfg.test:
        tested = as_test_metrics(evaluate(model, data, "test", rt, batch_size=cfg.eval_batch_size,
                                          mean=mean, std=std, confusion=True))
    return Result(
        val_acc=best["val_acc"], val_top5=best["val_top5"], val_loss=best["val_loss"],
        best_epoch=best["epoch"], **tested, history=history,
        images_per_sec=images / train_seconds if train_seconds else 0.0,
        peak_memory_mb=peak_memory_mb(rt.device), device=str(rt.device),
        amp=str(rt.amp_dtype).removeprefix("torch.") if rt.amp_dtype else "off",
        checkpoint=str(ckpt_dir / checkpoint.BEST) if ckpt_dir else "",
        data=data.record, config=cfg.to_dict(), compile_seconds=compile_seconds,
        stopped_epoch=stopped,
    )


def _synced_clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_teacher(cfg: TrainConfig, data: ImageData, device: torch.device) -> torch.nn.Module:
    """The distillation teacher, checked to predict the same classes as this run's data: a KL
    term between logits of different classes is meaningless, or a shape error mid-step."""
    teacher, payload = load_model(cfg.teacher, device)
    facts = payload["data"]
    if list(facts["classes"]) != list(data.classes) or facts["in_channels"] != data.in_channels:
        raise ConfigError(
            f"teacher: {cfg.teacher!r} was trained on {len(facts['classes'])} classes of"
            f" {facts['in_channels']}-channel images ({facts['record'].get('dataset')}), but"
            f" {cfg.dataset} has {data.num_classes} classes of {data.in_channels}-channel"
            " images; distil from a teacher trained on the same dataset"
        )
    return teacher


def _seed_epoch(seed: int, epoch: int, device: torch.device) -> tuple[torch.Generator, Any]:
    """Shuffle and augmentation generators, and the global RNG (dropout), for this epoch."""
    epoch_seed = seed * 100_003 + epoch
    torch.manual_seed(epoch_seed)
    shuffle = torch.Generator().manual_seed(epoch_seed)
    augment = torch.Generator(device=device).manual_seed(epoch_seed + 1)
    return shuffle, augment


def _data_facts(data: ImageData) -> dict[str, Any]:
    """What a saved model needs to be rebuilt and fed: shapes, classes and normalisation."""
    return {
        "num_classes": data.num_classes, "in_channels": data.in_channels,
        "image_size": data.image_size, "classes": list(data.classes),
        "mean": list(data.mean), "std": list(data.std), "record": data.record,
    }


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any], where: Path) -> None:
    current = cfg.to_dict()
    # A field the checkpoint lacks was added since it was written: it ran with the default then
    # (e.g. best_metric, before which the best epoch was always the best val_acc).
    saved = {**TrainConfig().to_dict(), **saved}
    differing = sorted(
        k for k in current if k not in _RESUMABLE_DIFFERENCES and saved.get(k) != current[k]
    )
    if differing:
        raise ConfigError(
            f"checkpoint_dir {str(where)!r} holds a run with a different {differing[0]}"
            f" ({saved.get(differing[0])!r}, now {current[differing[0]]!r}); use another"
            " checkpoint_dir, or resume = false to start over"
        )

