"""How a trial ended, and what the worker does about it, in one table: the exception a trial
raised (or none) picks an `Outcome`, and the outcome says which state the trial is told, which
`fail_reason` it records, whether it goes back to the queue, and whether its last-epoch checkpoint
is kept for a retry to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import optuna
from optuna.trial import TrialState

from trainer.contract import DataUnavailable, Diverged, Interrupted, OutOfMemory


class Duplicate(RuntimeError):
    """The trial's configuration was trained already: another trial of its stage holds it (two
    workers sampled the same untried one at once), or it is the one the stage carried in from an
    earlier stage's trial with the same epochs and seed (a user queued it before the stage
    opened). It is not trained."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"the same configuration as {holder}; not trained again")


@dataclass(frozen=True)
class Rule:
    # The state the trial is told; None: not told here (handed back to the queue, or already
    # failed by a reaper).
    state: TrialState | None
    fail_reason: str | None = None  # user attr `fail_reason`; None: none recorded
    hand_back: bool = False  # failed and its copy queued in one commit, keeping its slot
    keep_checkpoint: bool = False  # its last.pt stays for the retry to resume from
    error: bool = False  # counts toward the worker's streak of errors (`ERROR_LIMIT`)
    # Not the configuration's fault, and not a finished trial either: neither resets nor grows
    # the error streak.
    neutral: bool = False


class Outcome(Enum):
    COMPLETE = "complete"
    PRUNED = "pruned"  # by the stage's pruner
    OOM = "oom"  # pruned: did not fit even in micro-batches of one image
    DIVERGED = "diverged"  # pruned: the loss became NaN or infinite
    DUPLICATE = "duplicate"  # failed untrained: another trial holds its configuration
    INTERRUPTED = "interrupted"  # the worker was told to stop: handed back
    NO_DATA = "no data"  # this machine cannot read the data: handed back, the worker stops
    ERROR = "error"  # anything else: a bad configuration, a bug, a broken file
    TAKEN_OVER = "taken over"  # a reaper failed it while it ran here; its retry is queued

    @property
    def rule(self) -> Rule:
        return RULES[self]


RULES: dict[Outcome, Rule] = {
    Outcome.COMPLETE: Rule(TrialState.COMPLETE),
    Outcome.PRUNED: Rule(TrialState.PRUNED),
    Outcome.OOM: Rule(TrialState.PRUNED, "oom"),
    Outcome.DIVERGED: Rule(TrialState.PRUNED, "diverged"),
    Outcome.DUPLICATE: Rule(TrialState.FAIL, "duplicate", keep_checkpoint=True, neutral=True),
    Outcome.INTERRUPTED: Rule(None, "interrupted", hand_back=True, keep_checkpoint=True),
    Outcome.NO_DATA: Rule(None, "no data", hand_back=True, keep_checkpoint=True),
    Outcome.ERROR: Rule(TrialState.FAIL, "error", error=True),
    Outcome.TAKEN_OVER: Rule(None, keep_checkpoint=True),
}

# The exception a trial raised, to its outcome: the first class that matches, in this order.
RAISED: tuple[tuple[type[BaseException], Outcome], ...] = (
    (optuna.TrialPruned, Outcome.PRUNED),
    (Duplicate, Outcome.DUPLICATE),
    (OutOfMemory, Outcome.OOM),
    (Diverged, Outcome.DIVERGED),
    (Interrupted, Outcome.INTERRUPTED),
    (DataUnavailable, Outcome.NO_DATA),
    (optuna.exceptions.UpdateFinishedTrialError, Outcome.TAKEN_OVER),
    (Exception, Outcome.ERROR),
)


def classify(error: BaseException | None) -> Outcome:
    """The outcome of a trial that raised `error` (None: it returned a value)."""
    if error is None:
        return Outcome.COMPLETE
    return next((outcome for kind, outcome in RAISED if isinstance(error, kind)), Outcome.ERROR)
