"""What a person reads when a search is over: `hpo best` (the winning parameters by the stage that
searched them, and the metrics) and the short summary `hpo run` ends with (per stage trials, best
and epochs saved; the winner; where the log is and the commands for the report and the export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.results.snapshot import Snapshot, duration
from search.space.spec import Pipeline

VAL_METRICS = ("val_acc", "val_loss")
TEST_METRICS = ("test_acc", "test_top5", "test_macro_f1")


def by_stage(info: dict[str, Any], pipe: Pipeline) -> list[tuple[str, dict[str, Any] | None]]:
    """The winner's value of each stage's searched parameters; None for a stage after the
    winner's, whose trials did not beat the configuration it carried."""
    stages = [s for s in pipe.stages if s.confirms is None]  # it searches nothing
    names = [s.name for s in stages]
    # A confirmed winner re-ran a trial of an earlier stage: its parameters were found there.
    found = info["confirmed"]["of"]["stage"] if info.get("confirmed") else info["stage"]
    won = names.index(found)
    return [(s.name, {k: info["config"].get(k) for k in s.params} if i <= won else None)
            for i, s in enumerate(stages)]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _value(v: Any) -> str:
    if not isinstance(v, float):
        return repr(v)
    text = f"{v:.4g}"
    return text if any(c in text for c in ".en") else f"{text}.0"  # 1.0 stays a float


def best_lines(info: dict[str, Any], pipe: Pipeline, *, every_field: bool = False) -> list[str]:
    lines = [f"best: stage {info['stage']!r} trial {info['trial']}, {info['metric']} ="
             f" {info['value']:.4f}"]
    confirmed = info.get("confirmed")
    if confirmed:
        of = confirmed["of"]
        lines.append(f"  confirmed: {info['metric']} {confirmed['mean']:.4f} ±"
                     f" {confirmed['std']:.4f} over {plural(confirmed['seeds'], 'seed')}"
                     f" (re-runs of {of['stage']} #{of['trial']}, {of['value']:.4f} there)")
    rows = []
    for name, params in by_stage(info, pipe):
        if params is None:
            rows.append((name, "no trial beat the configuration it carried"))
            continue
        found = info["confirmed"]["of"]["stage"] if info.get("confirmed") else info["stage"]
        label = name if name == found else f"{name} (carried)"
        rows.append((label, ", ".join(f"{k} = {_value(v)}" for k, v in params.items())
                     or "no parameters"))
    width = max(len(label) for label, _ in rows) + 1
    lines += [f"  {(label + ':').ljust(width)} {text}" for label, text in rows]
    metrics = info["metrics"]
    shown = [f"{k} {metrics[k]:.4f}" for k in VAL_METRICS if isinstance(metrics.get(k), float)]
    if shown:
        lines.append(f"  metrics: {', '.join(shown)}")
    test = info.get("test") or {}
    shown = [f"{k} {test[k]:.4f}" for k in TEST_METRICS if isinstance(test.get(k), float)]
    lines.append(f"  test (once, for the winner): {', '.join(shown)}" if shown else
                 "  test: not evaluated yet (the first worker to find the search done does it;"
                 " or `hpo export`)")
    if every_field:
        lines.append("  config:")
        lines += [f"    {k} = {v!r}" for k, v in sorted(info["config"].items())]
    return lines


def run_summary(
    snap: Snapshot, pipe: Pipeline, info: dict[str, Any] | None, *, elapsed: float,
    code: int, log_path: Path | None, study: str,
) -> list[str]:
    """About 15 lines: how the run ended, each stage, the winner, and where to go next."""
    trials = sum(s.finished + s.failed + s.handed_back for s in snap.stages)
    how = ("finished" if code == 0 and snap.done else
           "stopped" if code == 0 else "ended with failing workers")
    lines = [f"{study}: {how} in {duration(elapsed)}, {trials} trials on"
             f" {len(snap.workers)} worker{'s' if len(snap.workers) != 1 else ''}"]
    width = max(len(s.name) for s in snap.stages)
    for s in snap.stages:
        best = "best -" if s.best_value is None else f"best {s.best_value:.4f} #{s.best_trial}"
        counts = [f"{k} {n}" for k, n in sorted(s.reasons.items(),
                                                   key=lambda kv: kv[0] != "complete")]
        if s.epochs_saved:
            counts.append(f"{plural(s.epochs_saved, 'epoch')} saved by pruning")
        if s.early_stopped:
            counts.append(f"{plural(s.epochs_early_stopped, 'epoch')} saved by early stopping"
                          f" ({plural(s.early_stopped, 'trial')})")
        lines.append(f"  {s.name.ljust(width)}  {s.finished}/{s.budget}  {best}"
                     f"  {', '.join(counts) or 'no trial yet'}")
    if info is not None:
        lines += best_lines(info, pipe)
    if log_path is not None:
        lines.append(f"log:    {log_path}")
    if not snap.done:
        lines.append("resume: the same command again (handed-back trials resume from their last"
                     " epoch)")
    if info is not None:
        lines.append(f"report: hpo report {study} --out {study}.html")
        lines.append(f"export: hpo export {study} --out {study}-best/")
        lines.append(f"every field of the winner: hpo best {study} --all")
    return lines
