"""Pipelines in the database: one Optuna study per stage (`<study>/<stage>`), the pipeline
definition stored beside them, stage accounting, and what each stage carries over.

A stage closes when its budget of finished (complete or pruned) trials is spent (the rules are in
`search.db.budget`). The next one
opens from the best complete trial of all stages before it: that trial's full configuration,
which already holds what its own stage carried in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.db import budget, registry, writes
from search.db import optuna_private as op
from search.db.budget import BUDGET, PATIENCE, SPACE_SIZE, TRAINED_BEFORE, Counts
from search.space import grid
from search.space.params import ParamError, distribution, field_value, in_range
from search.space.spec import WORKER_OWNED, Pipeline, Stage, base_config
from trainer.config import ConfigError, TrainConfig, with_overrides

WARM_FROM = "warm_from"  # a warm trial's user attr: {"stage", "trial"} it was made from
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class PipelineError(RuntimeError):
    """A user-facing problem with a study: unknown, created from another file, failing."""


def stage_study_name(study: str, stage: str) -> str:
    return f"{study}/{stage}"


def check_study_name(name: str) -> None:
    if not STUDY_NAME.match(name):
        raise PipelineError(
            f"study name {name!r} is not allowed: use 1-100 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )


def create(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, source: str
) -> bool:
    """Store the pipeline and create its stage studies. True if created, False if it existed
    with the same definition; a different definition under the same name is refused."""
    check_study_name(name)
    registry.create_schema(storage.engine)
    created = registry.insert_pipeline(
        storage.engine, name, pipeline.to_json(), pipeline.digest(), source
    )
    if not created:
        existing = registry.get_pipeline_row(storage.engine, name)
        assert existing is not None
        if existing["digest"] != pipeline.digest():
            raise PipelineError(
                f"study {name!r} already exists, created from {existing['source']} with a"
                f" different definition than {source}; choose another --study name"
            )
        # The stored definition, which `hpo extend` may have given larger budgets.
        pipeline = Pipeline.from_json(existing["spec"])
    # Create (or find, after an interrupted create) every stage study, so the dashboard shows the
    # whole pipeline from the start.
    for index, stage in enumerate(pipeline.stages):
        study = optuna.create_study(
            storage=storage, study_name=stage_study_name(name, stage.name),
            direction=pipeline.direction, load_if_exists=True,
        )
        study.set_user_attr("stage", f"{index + 1}/{len(pipeline.stages)}: {stage.name}")
        # Once set, the budget is the workers' (`hpo extend` raises it, a stage that runs out of
        # patience passes some on): a create run again must not reset it.
        if BUDGET not in study.user_attrs:
            study.set_user_attr(BUDGET, stage.trials)
        if stage.patience is not None:
            study.set_user_attr(PATIENCE, stage.patience)
        size = grid.size(stage.params)
        if size is not None:
            study.set_user_attr(SPACE_SIZE, size)
        study.set_user_attr("epochs", stage.epochs)
        study.set_user_attr("params", sorted(stage.params))
        if stage.start:
            # Now, not when the stage opens: the stage's first trials, shown as queued in the
            # dashboard from the start, and each queued once (`writes.queue_start`).
            writes.queue_start(study, stage.start)
    return created


def load(storage: optuna.storages.RDBStorage, name: str) -> Pipeline:
    row = registry.get_pipeline_row(storage.engine, name)
    if row is None:
        known = registry.list_pipelines(storage.engine)
        hint = f" (studies here: {', '.join(known)})" if known else " (run `hpo create` first)"
        raise PipelineError(f"no study named {name!r} in this storage{hint}")
    return Pipeline.from_json(row["spec"])


def load_stage_study(
    storage: optuna.storages.RDBStorage, name: str, stage: Stage, **kwargs: Any
) -> optuna.Study:
    return optuna.load_study(
        study_name=stage_study_name(name, stage.name), storage=storage, **kwargs
    )


def counts(study: optuna.Study) -> Counts:
    """Trials of a stage study by state, counted in the database."""
    return stage_state(study)[0]


def stage_state(study: optuna.Study) -> tuple[Counts, budget.Limit]:
    """A stage's counts and budget, as the budget rules (`search.db.budget`) take them."""
    backend = op.study_rdb(study)
    assert backend is not None, "stage studies live in a database"
    return budget.state(backend.engine, op.study_id(study))


def best_trial(
    trials: Iterable[FrozenTrial], direction: str, ties: str = "earlier", metric: str = "val_acc"
) -> FrozenTrial | None:
    """The best complete trial of `trials` by `direction`; of equal ones, as `ties` says
    (`better`)."""
    best: FrozenTrial | None = None
    for trial in trials:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        if best is None or better(trial, best, direction, ties, metric):
            best = trial
    return best


def better(
    trial: FrozenTrial, than: FrozenTrial, direction: str, ties: str = "earlier",
    metric: str = "val_acc",
) -> bool:
    """Whether complete `trial`, which comes after complete `than` (a later trial, or a later
    stage's), takes its place as the best: a better value, or an equal one and `ties` is
    "later", or "val_loss" and a lower recorded validation loss. ("earlier": it does not.)"""
    sign = 1.0 if direction == "maximize" else -1.0
    assert trial.value is not None and than.value is not None
    mine, theirs = sign * trial.value, sign * than.value
    if mine != theirs:
        return mine > theirs
    if ties == "later":
        return True
    if ties == "val_loss":
        return val_loss(trial, metric) < val_loss(than, metric)
    return False


def val_loss(trial: FrozenTrial, metric: str) -> float:
    """A trial's recorded validation loss: its result's (user attribute `metrics`), else that of
    its best epoch (`epochs`: the first whose `metric` is the trial's value); inf if neither."""
    found = (trial.user_attrs.get("metrics") or {}).get("val_loss")
    if found is None:
        best = [e for e in trial.user_attrs.get("epochs") or []
                if isinstance(e, dict) and e.get(metric) == trial.value]
        found = best[0].get("val_loss") if best else None
    if isinstance(found, bool) or not isinstance(found, int | float) or math.isnan(found):
        return math.inf
    return float(found)


def best_of(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, stages: list[Stage]
) -> tuple[Stage, FrozenTrial] | None:
    """The best complete trial over `stages`, by the pipeline's metric and direction; of equal
    ones, as the pipeline's `ties` says (the earliest stage's by default)."""
    found: list[tuple[Stage, FrozenTrial]] = []
    for stage in stages:
        study = load_stage_study(storage, name, stage)
        trial = best_trial(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                           pipeline.direction, pipeline.ties, pipeline.metric)
        if trial is not None:
            found.append((stage, trial))
    best = best_trial((t for _, t in found), pipeline.direction, pipeline.ties, pipeline.metric)
    return next(((s, t) for s, t in found if t is best), None)


def candidates(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, index: int
) -> list[dict[str, Any]]:
    """What the confirmation stage `index` re-runs: the best `top` distinct configurations of
    the stages before it (best first), each with seeds base + 1 .. base + `seeds`, as the user
    attribute `candidate` of its queued trials."""
    confirm = pipeline.stages[index].confirms
    assert confirm is not None
    ranked: list[tuple[float, int, Stage, FrozenTrial]] = []
    for order, stage in enumerate(pipeline.stages[:index]):
        study = load_stage_study(storage, name, stage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.value is not None:
                ranked.append((t.value, order, stage, t))
    sign = -1.0 if pipeline.direction == "maximize" else 1.0
    # Best first; of equal values, the earlier stage and trial, as `best_of` picks.
    ranked.sort(key=lambda r: (sign * r[0], r[1], r[3].number))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for value, _, stage, trial in ranked:
        values = carried_from(trial)
        same = json.dumps(values, sort_keys=True)
        if same in seen:
            continue
        seen.add(same)
        base = int(trial.user_attrs.get("config", {}).get("seed", 0))
        rank = len(seen)
        out += [{"key": f"{rank}:{s}", "rank": rank, "stage": stage.name, "trial": trial.number,
                 "value": value, "seed": base + s, "values": values}
                for s in range(1, confirm.seeds + 1)]
        if rank == confirm.top:
            break
    return out
def warm_trials(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, index: int,
    carried: dict[str, Any],
) -> list[FrozenTrial]:
    """The warm start of stage `index` (opened with `carried`): the complete trials of the stages
    before it that share its base, as trials of this stage's parameters for its TPE to read.

    A trial shares the base when its recorded configuration (user attribute `config`) equals the
    TrainConfig this stage's trials start from (`base_config` through `with_overrides`) on every
    parameter some stage of the pipeline searches and this one does not, and its values of this
    stage's parameters lie within this stage's ranges. They come numbered -n..-1 in the order
    the stages and trials ran, with trial ids to match (no stored trial has a negative one), so
    TPE weighs them as older than the stage's own; user attribute `warm_from` says where each
    came from. Reads only."""
    stage = pipeline.stages[index]
    if not stage.params:
        return []
    try:
        base = with_overrides(TrainConfig(), base_config(pipeline, stage, carried))
    except ConfigError:  # not a configuration any trial of the stage starts from
        return []
    others = {key for s in pipeline.stages for key in s.params} - set(stage.params)
    chosen: list[tuple[str, FrozenTrial, dict[str, Any]]] = []
    for earlier in pipeline.stages[:index]:
        study = load_stage_study(storage, name, earlier)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            values = _sharing_base(trial, base, others, stage)
            if values is not None and trial.value is not None:
                chosen.append((earlier.name, trial, values))
    distributions = {key: distribution(p) for key, p in stage.params.items()}
    n = len(chosen)
    return [
        FrozenTrial(
            number=i - n, trial_id=i - n, state=TrialState.COMPLETE, value=trial.value,
            values=None, datetime_start=trial.datetime_start,
            datetime_complete=trial.datetime_complete, params=values,
            distributions=dict(distributions), intermediate_values={}, system_attrs={},
            user_attrs={WARM_FROM: {"stage": origin, "trial": trial.number}},
        )
        for i, (origin, trial, values) in enumerate(chosen)
    ]


def _sharing_base(
    trial: FrozenTrial, base: TrainConfig, others: set[str], stage: Stage
) -> dict[str, Any] | None:
    """The trial's values of `stage`'s params if it shares the stage's base, else None."""
    config = trial.user_attrs.get("config")
    if not isinstance(config, dict):
        return None
    try:
        if any(field_value(key, config[key]) != getattr(base, key) for key in others):
            return None
        return {key: in_range(p, field_value(key, config[key])) for key, p in stage.params.items()}
    except (KeyError, ParamError):  # a field the trial did not record, or a value out of range
        return None


def carried_from(trial: FrozenTrial) -> dict[str, Any]:
    """The searchable part of a trial's configuration: what it carried in plus its own params."""
    return {**trial.user_attrs.get("carried", {}), **trial.params}


def open_stage(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, index: int
) -> registry.OpenedStage:
    """The carried values of stage `index`, recording them first if nobody has, and whether an
    earlier stage trained the configuration its trials start from (`trained_before`)."""
    stage = pipeline.stages[index]
    opened = registry.get_stage(storage.engine, name, stage.name)
    if opened is None:
        opened = _open_new(storage, name, pipeline, index)
    if stage.confirms is not None:
        # Every time, not only by the worker that opened it: queueing is idempotent, and a
        # worker that died between the two leaves the queue to the next.
        writes.queue_candidates(load_stage_study(storage, name, stage),
                                candidates(storage, name, pipeline, index))
    trained = trained_before(storage, name, pipeline, index, opened)
    if trained is not None:
        # By every worker before its first trial, so that each one's count of held
        # configurations includes it (`budget.count`); the value is the same for all.
        study = load_stage_study(storage, name, stage)
        if study.user_attrs.get(TRAINED_BEFORE) != trained:
            study.set_user_attr(TRAINED_BEFORE, trained)
    return replace(opened, trained=trained)


def trained_before(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, index: int,
    opened: registry.OpenedStage,
) -> str | None:
    """`grid.key` of the configuration stage `index`'s trials start from, when its space is
    finite, that configuration is one of the space's, and the trial it carried from recorded
    the same configuration (every field but the worker's own: epochs, seed and the rest). That
    trial's result is what training it again would give: training is deterministic for a seed.
    Reads only."""
    stage = pipeline.stages[index]
    configurations = grid.configurations(stage.params)
    origin = opened.source
    if configurations is None or stage.confirms is not None or "trial" not in origin:
        return None
    try:
        base = with_overrides(TrainConfig(), base_config(pipeline, stage, opened.carried))
    except ConfigError:  # not a configuration any trial of the stage starts from
        return None
    key = grid.key({param: getattr(base, param) for param in stage.params})
    if key not in {grid.key(c) for c in configurations}:
        return None
    earlier = load_stage_study(storage, name, pipeline.stage(origin["stage"]))
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
        op.study_id(earlier), int(origin["trial"])))
    expected = {k: v for k, v in base.to_dict().items() if k not in WORKER_OWNED}
    recorded = trial.user_attrs.get("config")
    same = json.dumps(recorded, sort_keys=True) == json.dumps(expected, sort_keys=True)
    return key if same else None


def _open_new(
    storage: optuna.storages.RDBStorage, name: str, pipeline: Pipeline, index: int
) -> registry.OpenedStage:
    stage = pipeline.stages[index]
    carried: dict[str, Any] = {}
    source: dict[str, Any] = {}
    best = best_of(storage, name, pipeline, list(pipeline.stages[:index]))
    if index > 0 and best is None:
        raise PipelineError(
            f"stage {stage.name!r} cannot open: no trial of the stages before it completed"
        )
    if best is not None:
        best_stage, trial = best
        carried = carried_from(trial)
        source = {"stage": best_stage.name, "trial": trial.number, "value": trial.value}
    if stage.teacher:
        teacher = best_of(storage, name, pipeline, [pipeline.stage(stage.teacher)])
        if teacher is None or not teacher[1].user_attrs.get("checkpoint"):
            raise PipelineError(
                f"stage {stage.name!r}: its teacher stage {stage.teacher!r} has no complete"
                " trial with a checkpoint"
            )
        source["teacher"] = {"stage": stage.teacher, "trial": teacher[1].number}
        carried["teacher"] = teacher[1].user_attrs["checkpoint"]
    opened = registry.open_stage(storage.engine, name, stage.name, carried, source)
    study = load_stage_study(storage, name, stage)
    study.set_user_attr("carried", opened.carried)
    study.set_user_attr("carried_from", opened.source)
    return opened

