"""Study management: `hpo list` (every study in a storage, with its state, best value and last
activity), `hpo delete` (stage studies, the pipeline's rows and its artifacts), `hpo extend` (a
stage's budget) and `hpo enqueue` (a configuration the next free worker trains first).

Every refusal is raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa

from search.artifacts import Artifacts
from search.db import optuna_private as op
from search.db import pipeline, registry
from search.db.budget import BUDGET, HOLDING
from search.db.storage import GRACE_SECONDS
from search.results import snapshot
from search.space import grid
from search.space.params import ParamError, check_config, field_value, in_range, show
from search.space.spec import Pipeline, Stage, base_config

PipelineError = pipeline.PipelineError


def list_rows(storage: optuna.storages.RDBStorage) -> list[tuple[str, str, str, str]]:
    """(study, state, best, last activity) for each pipeline in the storage."""
    rows = []
    for name in registry.list_pipelines(storage.engine):
        pipe = pipeline.load(storage, name)
        snap = snapshot.read(storage, name, pipe)
        best = snap.best
        rows.append((name, _state(snap),
                     f"{pipe.metric} {best[2]:.4f} ({best[0]} #{best[1]})" if best else "-",
                     _last_activity(snap)))
    return rows


def _state(snap: snapshot.Snapshot) -> str:
    if snap.done:
        return "done"
    current = next(s for s in snap.stages if not s.closed)
    live = len(snap.live_workers)
    if live:
        return f"running {current.name} ({live} worker{'s' if live > 1 else ''})"
    if not snap.trials:
        return "not started"
    return f"paused in {current.name} (no live worker)"


def _last_activity(snap: snapshot.Snapshot) -> str:
    times = [t for trial in snap.trials.values()
             for t in (trial.datetime_start, trial.datetime_complete) if t is not None]
    return max(times).strftime("%Y-%m-%d %H:%M:%S") if times else "-"


def _closed_by_later(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline,
                     stage: Stage, what: str) -> None:
    """Refuse to change an earlier stage once a later one opened from its best trial: the later
    stages carry what it had found then, so more trials there would change nothing."""
    index = pipe.stages.index(stage)
    for later in pipe.stages[index + 1:]:
        opened = registry.get_stage(storage.engine, name, later.name)
        if opened is not None:
            open_now = [s.name for s in pipe.stages
                        if registry.get_stage(storage.engine, name, s.name) is not None][-1]
            raise PipelineError(
                f"cannot {what} stage {stage.name!r}: it is closed, and stage {later.name!r}"
                f" already opened from its best trial (#{opened.source.get('trial')}), so more"
                f" trials there would change nothing later stages use; use the open stage"
                f" {open_now!r} or the last stage {pipe.stages[-1].name!r}"
            )


def _stage(pipe: Pipeline, name: str) -> Stage:
    try:
        return pipe.stage(name)
    except KeyError:
        raise PipelineError(f"--stage {name!r}: no such stage (stages:"
                            f" {', '.join(s.name for s in pipe.stages)})") from None


def extend(storage: optuna.storages.RDBStorage, name: str, stage_name: str, trials: int) -> str:
    """Raise a stage's budget to `trials`: the stage study's "budget" attribute (what workers
    count against) and the stored pipeline (what status and report show). The digest stays
    that of the file the study was created from, so `hpo create` with it still matches."""
    pipe = pipeline.load(storage, name)
    stage = _stage(pipe, stage_name)
    study = pipeline.load_stage_study(storage, name, stage)
    budget = int(study.user_attrs.get(BUDGET, stage.trials))
    if trials <= budget:
        raise PipelineError(f"--trials {trials}: stage {stage.name!r} has a budget of {budget}"
                            " already; extend only raises it")
    size = grid.size(stage.params)
    if size is not None and trials > size:
        raise PipelineError(
            f"--trials {trials}: stage {stage.name!r} has {size} distinct configurations and"
            f" trains each once, so a budget above {size} adds nothing")
    _closed_by_later(storage, name, pipe, stage, "extend")
    stages = tuple(dataclasses.replace(s, trials=trials) if s is stage else s
                   for s in pipe.stages)
    extended = dataclasses.replace(pipe, stages=stages)
    # A later pass of a cyclic pipeline (`cycles`) is stored as its first pass: its own budget
    # lives in its study's attribute alone, which `hpo create` leaves as it is.
    if Pipeline.from_json(extended.to_json()) == extended:
        with storage.engine.begin() as conn:
            conn.execute(sa.update(registry.pipelines).where(registry.pipelines.c.name == name)
                         .values(spec=extended.to_json()))
    study.set_user_attr(BUDGET, trials)
    done = pipeline.counts(study).finished
    return (f"stage {stage.name!r} of {name!r}: budget {budget} -> {trials} ({done} finished);"
            " live workers take the new trials, or start some with `hpo worker` / `hpo run`")


def enqueue(storage: optuna.storages.RDBStorage, name: str, stage_name: str, text: str) -> str:
    """Queue a WAITING trial of `stage` with the given parameter values, checked as a space
    file's would be; workers take WAITING trials before sampling new ones."""
    pipe = pipeline.load(storage, name)
    stage = _stage(pipe, stage_name)
    params = _parse_params(text, stage)
    opened = registry.get_stage(storage.engine, name, stage.name)
    try:
        check_config({**base_config(pipe, stage, opened.carried if opened else {}), **params})
    except ParamError as e:
        raise PipelineError(f"--params: {e}") from None
    _closed_by_later(storage, name, pipe, stage, "enqueue into")
    study = pipeline.load_stage_study(storage, name, stage)
    budget = int(study.user_attrs.get(BUDGET, stage.trials))
    c = pipeline.counts(study)
    if c.finished + c.running + c.waiting >= budget:
        raise PipelineError(
            f"stage {stage.name!r} has no free slot: its budget of {budget} is taken by"
            f" {c.finished} finished, {c.running} running and {c.waiting} waiting trials; raise"
            f" it first with `hpo extend {name} --stage {stage.name} --trials {budget + 1}`"
        )
    _check_not_held(study, stage, params)
    if opened is not None:  # before the stage opens, the worker refuses it (objective.run)
        _check_not_carried(storage, name, pipe, stage, opened, params)
    study.enqueue_trial(params, user_attrs={snapshot.ENQUEUED: "user"})
    number = max(t.number for t in study.get_trials(deepcopy=False))
    return (f"queued trial #{number} of stage {stage.name!r} with {json.dumps(params)}; the next"
            " free worker trains it first")


def _check_not_held(study: optuna.Study, stage: Stage, params: dict[str, Any]) -> None:
    """A finite stage trains each configuration once (a repeat would fail untrained, its
    slot spent): refuse one that a trial holds already."""
    if grid.size(stage.params) is None or set(params) != set(stage.params):
        return  # a continuous space, or values left for the sampler to choose
    wanted = grid.key(params)
    for t in study.get_trials(deepcopy=False, states=HOLDING):
        held = t.params or t.system_attrs.get(op.FIXED_PARAMS, {})  # a WAITING trial's values
        if set(held) == set(params) and grid.key(held) == wanted:
            raise PipelineError(
                f"--params: stage {stage.name!r} trains each configuration once, and trial"
                f" #{t.number} ({t.state.name.lower()}) holds {json.dumps(params)} already")


def _check_not_carried(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, stage: Stage,
    opened: registry.OpenedStage, params: dict[str, Any],
) -> None:
    """Refuse the configuration a finite stage carried in when an earlier stage's trial trained
    exactly it (same epochs and seed): training is deterministic, so a repeat adds nothing."""
    if grid.size(stage.params) is None or set(params) != set(stage.params):
        return
    index = pipe.stages.index(stage)
    if pipeline.trained_before(storage, name, pipe, index, opened) != grid.key(params):
        return
    source = opened.source
    raise PipelineError(
        f"--params: stage {stage.name!r} trains each configuration once, and it carried"
        f" {json.dumps(params)} in from trial #{source['trial']} of stage {source['stage']!r},"
        " which trained it with the same epochs and seed")


def _parse_params(text: str, stage: Stage) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise PipelineError(f"--params: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f'--params: expected a JSON object like {{"lr": 0.1}}, got {show(raw)}')
    out = {}
    for key, value in raw.items():
        if key not in stage.params:
            raise PipelineError(f"--params: {key!r} is not searched in stage {stage.name!r}"
                                f" (it searches {', '.join(sorted(stage.params)) or 'nothing'})")
        try:
            out[key] = in_range(stage.params[key], field_value(key, value))
        except ParamError as e:
            raise PipelineError(f"--params: {key}: {e}") from None
    return out


@dataclasses.dataclass(frozen=True)
class DeletePlan:
    """What `delete` removes: `what` says it in a sentence, for the confirmation."""

    what: str
    paths: list[Path]  # this host's files: `<root>/<study>` and the stored checkpoints
    objects: list[str]  # the bucket's keys, for an S3 store


def plan_delete(
    storage: optuna.storages.RDBStorage, name: str, store: Artifacts, *, keep_objects: bool
) -> DeletePlan:
    """What `delete` would remove; refuses while workers live. With an S3 store the study's
    objects in the bucket go too, unless `keep_objects` (a bucket with its own lifecycle
    rules); the local folder is then this host's cache."""
    pipe = pipeline.load(storage, name)
    live = [w for w in registry.list_workers(storage.engine, name) if snapshot.is_live(w)]
    if live:
        raise PipelineError(
            f"study {name!r} has {len(live)} live worker(s) ("
            + ", ".join(f"#{w['id']} {w['host']}:{w['pid']}" for w in live)
            + f"); stop them first (a killed worker stops counting {GRACE_SECONDS}s after its"
            " last beat)"
        )
    trials, ids = 0, []
    for stage in pipe.stages:
        for t in pipeline.load_stage_study(storage, name, stage).get_trials(deepcopy=False):
            trials += 1
            for key, value in t.system_attrs.items():
                if key.startswith(op.ARTIFACTS_ATTR_PREFIX):
                    ids.append(json.loads(value)["artifact_id"])
    folder = store.root / name
    files = [store.root / "store" / a for a in ids]
    paths = [p for p in [folder, *files] if p.exists()]
    if store.url and not keep_objects:
        store.check()  # one clear line before anything is deleted, not a listing's traceback
    objects = [] if keep_objects else store.study_objects(name, ids)
    what = (f"study {name!r}: {len(pipe.stages)} stage studies with {trials} trials, its"
            f" pipeline and worker rows")
    if paths:
        what += f"; {folder} and {len(files)} stored checkpoint(s)"
    if objects:
        what += f"; {len(objects)} object(s) in {store.url}"
    if store.url and keep_objects:
        what += f" (objects under {store.url}/{name} in the bucket are kept)"
    return DeletePlan(what, paths, objects)


def delete(storage: optuna.storages.RDBStorage, name: str, plan: DeletePlan,
           store: Artifacts) -> None:
    """The bucket's objects first, then the stage studies, then the pipeline's rows, then
    files: a delete cut short leaves the pipeline row, so running it again finishes the job (a
    bucket that refuses a delete stops it before any row goes)."""
    store.delete_objects(plan.objects)
    pipe = pipeline.load(storage, name)
    for stage in pipe.stages:
        try:
            study_id = storage.get_study_id_from_name(pipeline.stage_study_name(name, stage.name))
        except KeyError:
            continue
        storage.delete_study(study_id)
    with storage.engine.begin() as conn:
        conn.execute(sa.delete(registry.workers).where(registry.workers.c.pipeline == name))
        conn.execute(sa.delete(registry.stages).where(registry.stages.c.pipeline == name))
        conn.execute(sa.delete(registry.pipelines).where(registry.pipelines.c.name == name))
    for p in plan.paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
