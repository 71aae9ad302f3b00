"""Which trial won the pipeline, and its test metrics, computed once.

The winner is the configuration with the best mean over its seeds once the confirmation stage (a
space file's `confirm` table) has run, represented by its best seed's run; before that, or
without one, the best complete trial of the stages (`pipeline.best_of`). Trials record validation
metrics only; the test split is evaluated for the winner alone, by the first worker to find the
pipeline done (or by `hpo export`), and stored on the last stage's study, so it is looked at
once, not once per trial.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial, TrialState

from search.artifacts import Artifacts
from search.db import optuna_private as op
from search.db import pipeline
from search.db.attrs import CANDIDATE, WINNER_TEST
from search.db.storage import with_retry
from search.space.spec import Pipeline, Stage


def find(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline
) -> tuple[Stage, FrozenTrial, list[dict[str, Any]]] | None:
    """(stage, trial, confirmation candidates best first) of the winner; None before any trial
    completed."""
    confirmed = confirmation(storage, name, pipe)
    if confirmed:
        return pipe.stages[-1], confirmed[0]["best"], confirmed
    found = pipeline.best_of(storage, name, pipe, [s for s in pipe.stages if s.confirms is None])
    return None if found is None else (found[0], found[1], [])


def confirmation(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline
) -> list[dict[str, Any]]:
    """The confirmation stage's candidates with at least one complete run, best mean first (of
    equal means, the better-ranked candidate): rank, the trial it re-ran, mean and standard
    deviation over its seeds, each run. Empty without a confirmation stage or before it ran."""
    if pipe.confirm is None:
        return []
    study = pipeline.load_stage_study(storage, name, pipe.stages[-1])
    groups: dict[int, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.value is not None and CANDIDATE in t.user_attrs:
            groups.setdefault(int(t.user_attrs[CANDIDATE]["rank"]), []).append(t)
    out: list[dict[str, Any]] = []
    for rank, runs in groups.items():
        values = [float(t.value) for t in sorted(runs, key=lambda t: t.number)
                  if t.value is not None]
        candidate = runs[0].user_attrs[CANDIDATE]
        out.append({
            "rank": rank, "of": {"stage": candidate["stage"], "trial": candidate["trial"],
                                 "value": candidate["value"]},
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values), "values": values,
            "runs": [t.number for t in sorted(runs, key=lambda t: t.number)],
            "best": pipeline.best_trial(runs, pipe.direction),
        })
    sign = -1.0 if pipe.direction == "maximize" else 1.0
    out.sort(key=lambda c: (sign * c["mean"], c["rank"]))
    return out


def stored_test(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, stage: Stage,
    trial: FrozenTrial,
) -> dict[str, Any] | None:
    """The test metrics stored for this winner (stage and trial), or None."""
    study = pipeline.load_stage_study(storage, name, pipe.stages[-1])
    found = study.user_attrs.get(WINNER_TEST)
    if isinstance(found, dict) and (found.get("stage"), found.get("trial")) == (
            stage.name, trial.number):
        return dict(found["metrics"])
    return None


Evaluate = Callable[[Path, str], dict[str, Any]]  # (checkpoint, device) -> test metrics


def evaluate_lazily(path: Path, device: str) -> dict[str, Any]:
    """`trainer.export.evaluate_saved`, imported when called: it imports torch."""
    from trainer.export import evaluate_saved

    return evaluate_saved(path, device)


def test_once(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, store: Artifacts,
    device: str = "auto", evaluate: Evaluate = evaluate_lazily,
) -> dict[str, Any] | None:
    """The winner's test metrics: stored ones, else evaluated now on its checkpoint and stored
    (the first writer wins: two workers finishing together may both evaluate the same model,
    and one result is kept). None before any trial completed."""
    found = find(storage, name, pipe)
    if found is None:
        return None
    stage, trial, _ = found
    known = stored_test(storage, name, pipe, stage, trial)
    if known is not None:
        return known
    ref = trial.user_attrs.get("checkpoint", "")
    path = store.local(ref) if ref else None
    if path is None or not path.is_file():
        raise pipeline.PipelineError(
            f"the winner's checkpoint {str(path)!r} is not on this machine; run where the"
            " workers' artifact folder (--artifacts / HPO_ARTIFACTS) is mounted")
    metrics = {k: v for k, v in evaluate(path, device).items() if k != "checkpoint"}
    record = {"stage": stage.name, "trial": trial.number, "metrics": metrics}
    last = pipeline.load_stage_study(storage, name, pipe.stages[-1])
    with_retry("store the winner's test metrics", lambda: _store_first(last, record))
    return stored_test(storage, name, pipe, stage, trial) or metrics


def _store_first(study: optuna.Study, record: dict[str, Any]) -> None:
    """Write `record` as the study's `winner_test` unless one for the same trial is there."""
    backend = op.study_rdb(study)
    assert backend is not None, "stage studies live in a database"
    attrs = op.STUDY_ATTRS
    with backend.engine.begin() as conn:
        conn.execute(sa.select(op.STUDIES.c.study_id)
                     .where(op.STUDIES.c.study_id == op.study_id(study)).with_for_update())
        old = conn.execute(sa.select(attrs.c.value_json).where(
            attrs.c.study_id == op.study_id(study), attrs.c.key == WINNER_TEST)).scalar()
        if old is not None:
            same = json.loads(old)
            if (same.get("stage"), same.get("trial")) == (record["stage"], record["trial"]):
                return
            conn.execute(sa.delete(attrs).where(attrs.c.study_id == op.study_id(study),
                                                attrs.c.key == WINNER_TEST))
        conn.execute(sa.insert(attrs).values(study_id=op.study_id(study), key=WINNER_TEST,
                                             value_json=json.dumps(record)))


