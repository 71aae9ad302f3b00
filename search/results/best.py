"""Reading a pipeline's results: per-stage status, the best configuration, and its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.artifacts import Artifacts
from search.db import budget as budget_rules
from search.db import pipeline, registry, winner
from search.space.spec import WORKER_OWNED, Pipeline


@dataclass(frozen=True)
class StageStatus:
    name: str
    budget: int  # as the database holds it: what the workers go by
    counts: budget_rules.Counts
    closed: bool
    exhausted: bool  # closed early: every configuration of its finite space was trained
    best_value: float | None
    best_trial: int | None
    carried: dict[str, Any] | None  # None: not opened yet
    seconds: float  # summed wall time of its finished trials
    # The best of the stages before it, when this stage's best ties or trails it: then the stage
    # carries nothing new to the next one. None: it improved, or has nothing to compare yet.
    not_beaten: dict[str, Any] | None = None
    # Closed for want of improvement (`patience`): the stage study's `closed_early` record,
    # {"patience", "finished", "passed", "to"}; None: it was not.
    closed_early: dict[str, Any] | None = None
    # The configuration it carried in is one of its space's and an earlier stage trained it
    # (`budget.TRAINED_BEFORE`): it counts as trained, and the stage does not train it again.
    trained_before: bool = False

    @property
    def verdict(self) -> str:
        """What a reader should know about how the stage ended, in one line, or ''."""
        said = []
        if self.exhausted and self.counts.finished < self.budget:
            said.append(f"closed early: all {self.counts.configurations} configurations of its"
                        " space were trained" + (", the one it carried in by an earlier stage"
                                                 if self.trained_before else ""))
        if self.closed_early is not None:
            c = self.closed_early
            passed = (f"passed {c['passed']} trials on to {c['to']}" if c.get("to")
                      else f"left {c['passed']} trials of its budget unspent")
            said.append(f"closed early: no better trial in its last {c['patience']}; {passed}")
        if self.not_beaten is not None:
            b = self.not_beaten
            said.append(f"did not beat {b['stage']} #{b['trial']} ({b['value']:.4f}):"
                        " carries nothing new")
        return "; ".join(said)


def stage_status(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline
) -> list[StageStatus]:
    out: list[StageStatus] = []
    earlier: tuple[str, FrozenTrial] | None = None  # the best (stage, trial) so far
    for stage in pipe.stages:
        study = pipeline.load_stage_study(storage, name, stage)
        trials = study.get_trials(deepcopy=False)
        best = pipeline.best_trial(trials, pipe.direction, pipe.ties, pipe.metric)
        opened = registry.get_stage(storage.engine, name, stage.name)
        counts, limit = pipeline.stage_state(study)
        not_beaten = None
        # A confirmation stage re-runs what it is compared with: it carries nothing either way.
        if best is not None and stage.confirms is None:
            # As `pipeline.best_of` picks what the next stage opens from: by default a tie with
            # the earlier best carries nothing new either (the file's `ties` can say otherwise).
            if earlier is None or pipeline.better(best, earlier[1], pipe.direction, pipe.ties,
                                                  pipe.metric):
                earlier = (stage.name, best)
            else:
                not_beaten = {"stage": earlier[0], "trial": earlier[1].number,
                              "value": earlier[1].value}
        out.append(StageStatus(
            name=stage.name, budget=stage.trials if limit.trials is None else limit.trials,
            counts=counts, closed=budget_rules.closed(counts, limit),
            exhausted=budget_rules.exhausted(counts, limit),
            best_value=best.value if best else None, best_trial=best.number if best else None,
            carried=opened.carried if opened else None,
            seconds=sum((t.duration or timedelta()).total_seconds() for t in trials),
            not_beaten=not_beaten, closed_early=study.user_attrs.get(budget_rules.CLOSED_EARLY),
            trained_before=limit.trained is not None,
        ))
    return out


def best(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline) -> dict[str, Any]:
    """The pipeline's winner: its full configuration (what `python -m trainer --config` takes),
    its metrics, and where it came from. With a confirmation stage that has run, the winner is
    the configuration with the best mean over its seeds (`confirmed`: mean, standard deviation,
    each seed's value), represented by its best seed's run; before that, the best complete
    trial. `test`: the winner's test metrics, computed once (`winner_test`), or None."""
    found = winner.find(storage, name, pipe)
    if found is None:
        raise pipeline.PipelineError(f"study {name!r} has no complete trial yet")
    stage, trial, confirmed = found
    config = {k: v for k, v in trial.user_attrs["config"].items() if k not in WORKER_OWNED}
    info: dict[str, Any] = {
        "study": name,
        "stage": stage.name,
        "trial": trial.number,
        "metric": pipe.metric,
        "value": trial.value,
        "config": config,
        "metrics": trial.user_attrs.get("metrics", {}),
        "checkpoint": trial.user_attrs.get("checkpoint", ""),
        "confirmed": None,
        "test": None,
    }
    if confirmed:
        top = confirmed[0]
        info["confirmed"] = {k: v for k, v in top.items() if k != "best"}
        info["confirmed"]["runners_up"] = [
            {k: v for k, v in c.items() if k not in ("best", "runs")} for c in confirmed[1:]]
    info["test"] = winner.stored_test(storage, name, pipe, stage, trial)
    return info


def best_checkpoint(info: dict[str, Any], store: Artifacts) -> Path:
    """The best trial's best.pt on this machine (downloaded from an object store into its cache)."""
    path = store.local(info["checkpoint"]) if info.get("checkpoint") else None
    if path is None or not path.is_file():
        raise pipeline.PipelineError(
            f"the best trial's checkpoint {str(path)!r} is not on this machine; run the command"
            " where the workers' artifact folder (--artifacts / HPO_ARTIFACTS) is mounted"
        )
    return path
