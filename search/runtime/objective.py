"""The one seam between the search and the trainer: an Optuna trial becomes a `TrainConfig`, the
trainer's per-epoch reports become `trial.report` and pruning, and what the run produced is
recorded on the trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.artifacts import upload_artifact

from search.artifacts import Artifacts
from search.db import optuna_private as op
from search.db import writes
from search.db.attrs import CANDIDATE, EARLY_STOPPED, GRAD_NORM
from search.db.storage import with_retry
from search.runtime.outcome import Duplicate
from search.runtime.retry import root_number
from search.space import grid
from search.space.spec import (
    WORKER_OWNED,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    Pipeline,
    Stage,
    base_config,
)
from trainer.config import TrainConfig, with_overrides
from trainer.contract import Interrupted, Report, Result

# A running trial's per-epoch metrics (user attribute "epochs", for the dashboard) are rewritten at
# most this often, and always when the trial ends: every epoch when epochs take longer, instead of
# ten writes a second when they are fast.
EPOCHS_WRITE_SECONDS = 5.0
log = logging.getLogger("hpo.trial")


class Train(Protocol):
    """What the worker calls to train a trial's configuration: `trainer.train.train`, or a stand-in
    (the load tests' and benchmarks' stub trainer) passed to the worker."""

    def __call__(self, cfg: TrainConfig, report: Report, *, stop: threading.Event) -> Result: ...


def train_lazily(cfg: TrainConfig, report: Report, *, stop: threading.Event) -> Result:
    """`trainer.train`, imported on the first trial rather than when the worker starts: torch
    costs a worker 300-800 MB and seconds of start-up, which a worker that never trains here
    (one with no GPU left to claim) should not pay."""
    from trainer.train import train as train_model

    return train_model(cfg, report, stop=stop)


@dataclass(frozen=True)
class TrialContext:
    study: str
    pipeline: Pipeline
    stage: Stage
    carried: dict[str, Any]
    artifacts: Artifacts  # trial checkpoints: a shared folder, or S3 with a local cache
    device: str
    worker: str  # "host:pid#id", recorded on each trial
    fault: str = ""  # passed to the trainer (tests inject OOM / NaN through it)
    train: Train = train_lazily
    # `grid.key` of the configuration the stage carried in when an earlier stage's trial trained
    # exactly it (`pipeline.trained_before`): a queued trial of it is not trained again.
    trained: str | None = None


def suggest(trial: optuna.Trial, name: str, param: Param) -> Any:
    if isinstance(param, FloatParam):
        return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
    assert isinstance(param, CategoricalParam)
    return trial.suggest_categorical(name, list(param.choices))


def suggest_once(trial: optuna.Trial, name: str, param: Param) -> Any:
    """`suggest`, retried through an outage, and the value the database holds if the retry
    follows a write whose reply was lost: Optuna's trial knows its parameters from its own
    memory, so it would sample anew (a random value during TPE's start-up trials), its write
    of the new value would be dropped against the stored one, and the trial would train a value
    other than the one recorded. (Parameter values are never None: TOML has no null.)"""

    def landed() -> Any:
        stored = op.storage_of(trial.study).get_trial(op.trial_id(trial))
        if name not in stored.params:
            return None
        op.cached_trial(trial).params[name] = stored.params[name]
        op.cached_trial(trial).distributions[name] = stored.distributions[name]
        return stored.params[name]

    return with_retry(f"suggest {name}", lambda: suggest(trial, name, param), landed=landed)


def upload_once(trial: optuna.Trial, store: Any, path: str) -> str:
    """`upload_artifact` (an Optuna artifact, so optuna-dashboard lists the checkpoint on the
    trial's page), retried through an outage, once: Optuna records the artifact on the trial
    before it copies the file, so a retry after a lost reply would list the checkpoint twice,
    the first time without a file behind it. The retry copies the file under the recorded id."""
    name = Path(path).name

    def landed() -> str | None:
        stored = op.storage_of(trial.study).get_trial(op.trial_id(trial))
        for key, value in stored.system_attrs.items():
            meta = json.loads(value) if key.startswith(op.ARTIFACTS_ATTR_PREFIX) else {}
            if meta.get("filename") == name:
                with open(path, "rb") as f:
                    store.write(meta["artifact_id"], f)
                return str(meta["artifact_id"])
        return None

    return with_retry("upload checkpoint", lambda: upload_artifact(
        artifact_store=store, file_path=path, study_or_trial=trial,
        # Python guesses `.pt` as a SNES page table; a checkpoint is bytes for torch.load.
        mimetype="application/octet-stream"), landed=landed)


def checkpoint_dir(ctx: TrialContext, trial: optuna.Trial) -> Path:
    """Shared by every attempt of one configuration, so a retry resumes where the last stopped."""
    return ctx.artifacts.root / ctx.study / ctx.stage.name / f"trial-{root_number(trial):05d}"


def carried(trial: optuna.Trial, ctx: TrialContext) -> dict[str, Any]:
    """What the trial starts from: the stage's carried values, or for a confirmation trial the
    configuration it re-runs, with its seed."""
    candidate = trial.user_attrs.get(CANDIDATE)
    if candidate is None:
        return ctx.carried
    return {**candidate["values"], "seed": candidate["seed"]}


def trial_config(trial: optuna.Trial, ctx: TrialContext) -> TrainConfig:
    params = {name: suggest_once(trial, name, p) for name, p in ctx.stage.params.items()}
    overrides = {
        **base_config(ctx.pipeline, ctx.stage, carried(trial, ctx)),
        **params,
        "checkpoint_dir": str(checkpoint_dir(ctx, trial)),
        "device": ctx.device,
        "resume": True,
        "fault": ctx.fault,
        "test": False,  # the winner alone is tested, once (search.db.winner)
    }
    if overrides.get("teacher"):  # recorded as the store names it; trained from a file here
        overrides["teacher"] = str(ctx.artifacts.local(str(overrides["teacher"])))
    return with_overrides(TrainConfig(), overrides)


def run(trial: optuna.Trial, ctx: TrialContext, stop: threading.Event) -> tuple[float, Result]:
    """Train the trial's configuration; returns the objective value and the trainer's result.
    Raises TrialPruned when the pruner says so, Duplicate for a configuration of a finite space
    that another trial holds, and the trainer's typed errors."""
    cfg = trial_config(trial, ctx)
    if grid.size(ctx.stage.params) is not None:
        key = grid.key(dict(trial.params))
        if key == ctx.trained:  # the sampler never proposes it; only a queued trial gets here
            raise Duplicate("the one the stage carried in, which an earlier stage trained")
        holder = writes.reserve(trial.study, trial, key)
        if holder is not None:
            raise Duplicate(f"trial #{holder}")
    public = {k: v for k, v in cfg.to_dict().items() if k not in WORKER_OWNED}
    start = carried(trial, ctx)
    if "teacher" in start:
        public["teacher"] = start["teacher"]
    _set_attrs(trial, {"config": public, "carried": start, "worker": ctx.worker,
                       "device": ctx.device})
    metric = ctx.pipeline.metric
    epochs: list[dict[str, Any]] = []
    written = [0, time.monotonic()]  # epochs on the trial's user attribute, and when

    def write_epochs() -> None:
        if len(epochs) > written[0]:
            _set_attrs(trial, {"epochs": epochs})
            written[:] = [len(epochs), time.monotonic()]

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        epochs.append(metrics)
        log.info("stage %s trial %d epoch %d/%d: %s %.4f, train_loss %.4f, %.0f img/s",
                 ctx.stage.name, trial.number, epoch, cfg.epochs, metric, metrics[metric],
                 metrics["train_loss"], metrics["images_per_sec"])
        with_retry("report", lambda: trial.report(metrics[metric], epoch))
        if stop.is_set():
            raise Interrupted(epoch)
        # After the last epoch (the configured last, or the one early stopping ends the run at)
        # the run is complete: pruning it would only throw its result away.
        last = epoch == cfg.epochs or bool(metrics.get("early_stop"))
        if not last and with_retry("should_prune", trial.should_prune):
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric} {metrics[metric]:.4f}")
        if time.monotonic() - written[1] >= EPOCHS_WRITE_SECONDS:
            write_epochs()

    try:
        with ctx.artifacts.synced(Path(cfg.checkpoint_dir), keep_last=Interrupted):
            result = ctx.train(cfg, report, stop=stop)
    except Exception:
        # A pruned, failed or handed-back trial keeps the epochs it ran. A trial a reaper failed
        # cannot take them; the worker handles that from the error raised already.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            write_epochs()
        raise
    best_epoch = result.history[result.best_epoch - 1]
    if result.stopped_epoch is not None:
        log.info("stage %s trial %d: early stopping after epoch %d of %d (best epoch %d)",
                 ctx.stage.name, trial.number, result.stopped_epoch, cfg.epochs,
                 result.best_epoch)
    with _named(Path(result.checkpoint), f"{ctx.study}-{ctx.stage.name}-trial{trial.number}.pt") \
            as upload:
        artifact = upload_once(trial, ctx.artifacts.optuna_store(), str(upload))
    _set_attrs(trial, {
        "epochs": epochs,
        # Validation only: the test split is evaluated once, for the winner (search.db.winner).
        "metrics": {k: v for k, v in result.metrics().items()
                    if k not in ("history", "config", "data", "confusion")
                    and not k.startswith("test_")},
        "images_per_sec": result.images_per_sec,
        "peak_memory_mb": result.peak_memory_mb,
        "checkpoint": ctx.artifacts.ref(result.checkpoint),
        "checkpoint_artifact": artifact,
        "split": result.data,
        **({EARLY_STOPPED: result.stopped_epoch} if result.stopped_epoch is not None else {}),
        **({GRAD_NORM: norms} if (norms := grad_norm_summary(result.history)) else {}),
    })
    return float(best_epoch[metric]), result


def grad_norm_summary(history: list[dict[str, Any]]) -> dict[str, float] | None:
    """{"mean", "max"} of the gradient norms over the epochs of `history` that recorded them, for
    the dashboard's trial attributes (epochs have equal step counts, so the mean of their means
    is the steps' mean); None when none did (a stub trainer, a checkpoint from before them)."""
    means = [h["grad_norm_mean"] for h in history if h.get("grad_norm_mean") is not None]
    peaks = [h["grad_norm_max"] for h in history if h.get("grad_norm_max") is not None]
    if not means or not peaks:
        return None
    return {"mean": sum(means) / len(means), "max": max(peaks)}


@contextlib.contextmanager
def _named(path: Path, name: str) -> Iterator[Path]:
    """`path` under the file name the dashboard's download gets (every trial's checkpoint is
    best.pt): a hard link beside it, removed after the upload; the path itself where the
    file system has no hard links."""
    link = path.with_name(name)
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
    except OSError:
        yield path
        return
    try:
        yield link
    finally:
        link.unlink(missing_ok=True)


def _set_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    with_retry(f"set {', '.join(attrs)}", lambda: writes.set_user_attrs(trial, attrs))
