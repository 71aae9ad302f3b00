"""What pruning, early stopping and staging saved, and how fast the search got where it did: the
epochs trained against the epochs a search without pruning or deduplication would have spent
(and of those saved, the pruner's and early stopping's shares), and the best validation metric
so far against cumulative training epochs (time to accuracy), per stage and for the pipeline.
Read from a `snapshot.Snapshot`, which has every trial already."""

from __future__ import annotations

from dataclasses import dataclass, field

from optuna.trial import FrozenTrial, TrialState

from search.results.snapshot import Snapshot
from search.space.spec import Pipeline

SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Savings:
    stage: str
    trained: int  # epochs the stage's trials trained (every attempt, failed ones too)
    # What a search of the same budget without pruning or deduplication trains: every one of
    # its `budget` trials for all of the stage's epochs.
    without: int
    by_pruning: int = 0  # epochs the pruned trials did not train
    # Epochs the complete trials that early stopping ended did not train, and how many trials.
    by_early_stop: int = 0
    early_stopped: int = 0

    @property
    def saved(self) -> int:
        return max(0, self.without - self.trained)


@dataclass
class Curve:
    """Best value so far after each finished trial, in the order trials finished."""

    name: str  # a stage, or "pipeline"
    epochs: list[int] = field(default_factory=list)  # cumulative epochs trained, at each point
    best: list[float] = field(default_factory=list)  # the best value so far there


def trained_epochs(trial: FrozenTrial) -> int:
    """Epochs a trial trained, as it reported them (a resumed retry reports only its own)."""
    return len(trial.intermediate_values)


def savings(snap: Snapshot, pipe: Pipeline) -> list[Savings]:
    out = []
    for stage, view in zip(pipe.stages, snap.stages, strict=True):
        trials = [t for (s, _), t in snap.trials.items() if s == stage.name]
        out.append(Savings(stage.name, sum(trained_epochs(t) for t in trials),
                           stage.trials * stage.epochs, by_pruning=view.epochs_saved,
                           by_early_stop=view.epochs_early_stopped,
                           early_stopped=view.early_stopped))
    return out


def curves(snap: Snapshot, pipe: Pipeline) -> list[Curve]:
    """One curve per stage (its own epochs and best) and one for the pipeline (all epochs, the
    best over every stage), each point a finished trial, in the order they finished."""
    sign = 1.0 if pipe.direction == "maximize" else -1.0
    done = sorted(((s, t) for (s, _), t in snap.trials.items()
                   if t.state.is_finished() and t.datetime_complete is not None),
                  key=lambda st: (st[1].datetime_complete, st[0], st[1].number))
    by_name = {s.name: Curve(s.name) for s in pipe.stages}
    whole = Curve("pipeline")
    spent: dict[str, int] = dict.fromkeys(by_name, 0)
    total = 0
    for stage, t in done:
        spent[stage] += trained_epochs(t)
        total += trained_epochs(t)
        value = t.value if t.state == TrialState.COMPLETE else None
        for curve, epochs in ((by_name[stage], spent[stage]), (whole, total)):
            best = curve.best[-1] if curve.best else None
            if value is not None and (best is None or sign * value > sign * best):
                best = value
            if best is not None:
                curve.epochs.append(epochs)
                curve.best.append(best)
    return [*by_name.values(), whole]


def sparkline(curve: Curve, width: int = 24) -> str:
    """The curve in `width` characters, epochs along the line, for a terminal."""
    if not curve.best:
        return ""
    low, high = min(curve.best), max(curve.best)
    last = curve.epochs[-1]
    marks = []
    for i in range(width):
        at = last * (i + 1) / width
        seen = [b for e, b in zip(curve.epochs, curve.best, strict=True) if e <= at]
        if not seen:
            marks.append(" ")
            continue
        level = 0 if high == low else round((seen[-1] - low) / (high - low) * (len(SPARK) - 1))
        marks.append(SPARK[level])
    return "".join(marks)


def reached(curve: Curve, fractions: tuple[float, ...] = (0.5, 0.9, 1.0)) -> list[str]:
    """When the curve got within each fraction of the way from its first to its final best:
    '0.9612 after 40 epochs'."""
    if not curve.best:
        return []
    first, final = curve.best[0], curve.best[-1]
    out = []
    for f in fractions:
        goal = first + f * (final - first)
        for e, b in zip(curve.epochs, curve.best, strict=True):
            if (b >= goal) if final >= first else (b <= goal):
                out.append(f"{b:.4f} after {e} epochs")
                break
    return list(dict.fromkeys(out))
