"""`hpo report`: one self-contained HTML file about a staged study, readable offline.

The page holds a summary table per stage, what pruning and early stopping saved, the gradient
norms (per trial and epoch in each stage, and by model depth: `gradients.py`), Optuna's plots per
stage (optimization history, intermediate values, parameter importances, parallel coordinates)
and the best trial's test metrics with its confusion matrix. plotly.js is embedded once in the
head, so the file opens without a network; every figure after it is a div and a call to
`Plotly.newPlot`. Text from the database is escaped; plotly escapes what it puts in its JSON
itself.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna import visualization as vis
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from search.db import pipeline
from search.results import gradients, progress, snapshot
from search.results.best import StageStatus, best, stage_status
from search.space.spec import Pipeline, Stage
from trainer.config import ConfigError
from trainer.files import write_atomic

# Importances and parallel coordinates compare trials: with fewer complete trials, or with every
# parameter at one value, Optuna either cannot draw them or draws something meaningless.
MIN_COMPARABLE = 2
PLOT_HEIGHT = "420px"

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #777; font-style: italic; }
code { font-size: 0.9em; }
"""


def format_value(value: float | None) -> str:
    """How the report shows a metric: four decimals, or "-" when there is none."""
    return "-" if value is None else f"{value:.4f}"


def write_report(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, out: Path
) -> None:
    """Write the report of study `name` to `out`. Everything is read and rendered before the
    file is touched, and the file appears whole or not at all (temp file + rename)."""
    page = render(storage, name, pipe)
    try:
        if not out.parent.is_dir():  # a typo in --out, not a folder to create
            raise FileNotFoundError(2, "No such file or directory")
        write_atomic(out, page.encode("utf-8"))
    except OSError as e:
        raise pipeline.PipelineError(
            f"cannot write the report to {out}: {e.strerror or e}; check the folder exists and"
            " is writable"
        ) from None


def render(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline) -> str:
    """The whole page as a string."""
    statuses = stage_status(storage, name, pipe)
    snap = snapshot.read(storage, name, pipe)
    title = f"{name}: {pipe.metric} ({pipe.direction})"
    parts = [
        f"<h1>Study {_esc(title)}</h1>",
        f"<p>Dataset <code>{_esc(pipe.dataset)}</code>, {len(pipe.stages)} stages, objective"
        f" <b>{_esc(pipe.metric)}</b> ({_esc(pipe.direction)}).</p>",
        "<h2>Stages</h2>",
        _summary(name, statuses),
        '<section id="savings">\n<h2>What pruning, early stopping and staging saved</h2>',
        _savings_section(snap, pipe),
        "</section>",
        '<section id="gradients">\n<h2>Gradient norm by model depth</h2>',
        _gradients_section(snap),
        "</section>",
        '<section id="best">\n<h2>Best model</h2>',
        _best_section(storage, name, pipe, statuses),
        "</section>",
    ]
    for stage, status in zip(pipe.stages, statuses, strict=True):
        parts.append(_stage_section(storage, name, stage, status))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n"
        # Inline, once: the report must open offline, and every figure below uses this copy.
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def _summary(name: str, statuses: list[StageStatus]) -> str:
    rows = []
    for s in statuses:
        c = s.counts
        if s.carried is None:
            carried = '<span class="note">not opened yet</span>'
        elif not s.carried:
            carried = '<span class="note">nothing (first stage)</span>'
        else:
            carried = f"<code>{_esc(json.dumps(s.carried, sort_keys=True))}</code>"
        best_value = format_value(s.best_value)
        if s.best_trial is not None:
            best_value += f" (#{s.best_trial})"
        rows.append([
            _esc(pipeline.stage_study_name(name, s.name)), str(s.budget), str(c.complete),
            str(c.pruned), str(c.failed), str(c.running + c.waiting), _esc(best_value), carried,
        ])
    return _table(["stage study", "budget", "complete", "pruned", "failed", "running/waiting",
                   "best value", "carried in"], rows)


def _savings_section(snap: snapshot.Snapshot, pipe: Pipeline) -> str:
    saved = progress.savings(snap, pipe)
    rows = [[_esc(s.stage), str(s.trained), str(s.without), str(s.saved), str(s.by_pruning),
             _early(s.by_early_stop, s.early_stopped)] for s in saved]
    trained, without = sum(s.trained for s in saved), sum(s.without for s in saved)
    rows.append(["<b>pipeline</b>", str(trained), str(without), str(max(0, without - trained)),
                 str(sum(s.by_pruning for s in saved)),
                 _early(sum(s.by_early_stop for s in saved), sum(s.early_stopped for s in saved))])
    out = [_table(["stage", "epochs trained", "without pruning or deduplication", "saved",
                   "of which by pruning", "of which by early stopping"], rows)]
    curves = [c for c in progress.curves(snap, pipe) if c.best]
    if not curves:
        out.append(_note("Not drawn: no trial has completed yet."))
        return "\n".join(out)
    fig = go.Figure()
    for c in curves:
        whole = c.name == "pipeline"
        fig.add_trace(go.Scatter(
            x=c.epochs, y=c.best, mode="lines+markers", name=c.name, line_shape="hv",
            line={"width": 3 if whole else 1.5, "dash": "solid" if whole else "dot"}))
    fig.update_layout(title=f"Time to accuracy: best {pipe.metric} so far", height=420,
                      xaxis={"title": "cumulative training epochs"},
                      yaxis={"title": f"best {pipe.metric} so far"})
    out += ["<h3>Time to accuracy</h3>", _figure(fig)]
    return "\n".join(out)


def _early(epochs: int, trials: int) -> str:
    """'12 (3 trials)': epochs early stopping saved, in how many trials."""
    return f"{epochs} ({trials} trial{'' if trials == 1 else 's'})" if trials else "0"


def _gradients_section(snap: snapshot.Snapshot) -> str:
    fig = gradients.depth_figure([(s, t) for (s, _), t in snap.trials.items()])
    if fig is None:
        return _note("Not drawn: no finished trial has recorded gradient norms yet.")
    return "\n".join([
        _figure(fig),
        _note("Each point is a finished trial's global gradient norm (before clipping), averaged"
              " over its steps. Trials of different depths differ in their other parameters too"
              " (learning rate, width, epochs trained), so this shows what the search did, not"
              " the effect of depth alone."),
    ])


def _best_section(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, statuses: list[StageStatus]
) -> str:
    if all(s.best_value is None for s in statuses):
        return _note("No trial has completed yet: no best model to show.")
    info = best(storage, name, pipe)
    m = info["test"] or {}
    out = [
        f"<p>Stage <b>{_esc(pipeline.stage_study_name(name, info['stage']))}</b>, trial"
        f" #{info['trial']}: {_esc(info['metric'])} = {format_value(info['value'])}.</p>",
    ]
    if info["confirmed"]:
        c = info["confirmed"]
        out.append(
            f"<p>Confirmed: {_esc(info['metric'])} {c['mean']:.4f} ± {c['std']:.4f} over"
            f" {c['seeds']} seeds ({', '.join(f'{v:.4f}' for v in c['values'])}), re-runs of"
            f" {_esc(c['of']['stage'])} #{c['of']['trial']} ({c['of']['value']:.4f} there).</p>")
    if not m:
        out.append(_note("Test metrics: not evaluated yet. The test split is evaluated once, for"
                         " the winner, by the first worker to find the search done (or by"
                         " `hpo export`)."))
    out += [
        _table(["test metric (evaluated once, for the winner)", "value"], [
            ["test accuracy (test_acc)", _num(m.get("test_acc"))],
            ["top-5 accuracy (test_top5)", _num(m.get("test_top5"))],
            ["macro F1 (test_macro_f1)", _num(m.get("test_macro_f1"))],
        ]),
    ]
    f1 = m.get("test_f1") or []
    confusion = m.get("confusion") or []
    names = _class_names(info, len(f1) or len(confusion))
    if f1:
        out += ["<h3>Per-class F1</h3>",
                _table(["class", "F1"], [[_esc(names[i]), _num(v)] for i, v in enumerate(f1)])]
    if confusion:
        out += ["<h3>Confusion matrix</h3>", _figure(_confusion_figure(confusion, names))]
    else:
        out.append(_note("The best trial recorded no confusion matrix."))
    config = sorted(info["config"].items())
    out += ["<h3>Configuration</h3>",
            _table(["field", "value"], [[_esc(k), f"<code>{_esc(repr(v))}</code>"]
                                        for k, v in config])]
    return "\n".join(out)


def _class_names(info: dict, k: int) -> list[str]:
    """The classes by name (ImageFolder folders, CIFAR's names, digits 0-9), as the best
    checkpoint recorded them; indices when that file is not on this machine."""
    from trainer.checkpoint import load

    try:
        names = [str(c) for c in load(info.get("checkpoint") or "")["data"]["classes"]]
    except (ConfigError, KeyError, TypeError):
        names = []
    return names if len(names) == k else [str(i) for i in range(k)]


def _confusion_figure(confusion: list[list[int]], labels: list[str]) -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=confusion, x=labels, y=labels, colorscale="Blues", texttemplate="%{z}",
        hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>",
    ))
    fig.update_layout(title="Confusion matrix (test split)", width=560, height=520,
                      xaxis={"title": "predicted class", "type": "category"},
                      yaxis={"title": "true class", "type": "category", "autorange": "reversed"})
    return fig


def _stage_section(
    storage: optuna.storages.RDBStorage, name: str, stage: Stage, status: StageStatus
) -> str:
    study = pipeline.load_stage_study(storage, name, stage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    varying = any(len({repr(t.params.get(p)) for t in complete}) > 1 for p in stage.params)
    comparable = len(complete) >= MIN_COMPARABLE and varying
    why_not = (f"needs at least {MIN_COMPARABLE} complete trials whose parameters differ"
               f" (this stage has {len(complete)} complete)")
    out = [f'<section id="stage-{_esc(stage.name)}">',
           f"<h2>Stage {_esc(pipeline.stage_study_name(name, stage.name))}</h2>",
           f"<p>{status.counts.finished} of {status.budget} trials finished,"
           f" {stage.epochs} epochs each.</p>"]
    if status.verdict:
        out.append(f'<p class="verdict">This stage {_esc(status.verdict)}.</p>')
    plots: list[tuple[str, bool, str, Callable[[optuna.Study], go.Figure]]] = [
        ("Optimization history", bool(complete), "no complete trial yet",
         vis.plot_optimization_history),
        ("Intermediate values (pruning)", any(t.intermediate_values for t in trials),
         "no trial has reported an epoch yet", vis.plot_intermediate_values),
        ("Parameter importances", comparable, why_not, vis.plot_param_importances),
        ("Parallel coordinates", comparable, why_not, vis.plot_parallel_coordinate),
    ]
    for heading, drawable, reason, plot in plots:
        out.append(f"<h3>{_esc(heading)}</h3>")
        out.append(_plot(study, plot) if drawable else _note(f"Not drawn: {reason}."))
        if plot is vis.plot_intermediate_values:  # the per-trial curves: norms beside them
            out.append("<h3>Gradient norm per epoch</h3>")
            norms = gradients.curves_figure(trials, f"Gradient norm per epoch, {stage.name}"
                                            " (before clipping)")
            out.append(_figure(norms) if norms is not None else _note(
                "Not drawn: no trial has recorded gradient norms yet."))
    out.append("</section>")
    return "\n".join(out)


def _plot(study: optuna.Study, plot: Callable[[optuna.Study], go.Figure]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fig = plot(study)
    # A plot Optuna cannot draw for this data costs a note, never the whole report.
    except Exception as e:
        return _note(f"Optuna could not draw this plot: {type(e).__name__}: {e}")
    return _figure(fig)


def _figure(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, default_height=PLOT_HEIGHT,
                       config={"responsive": True})


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already (escaped by the caller); numbers are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{c}</td>' if _is_number(c) else f"<td>{c}</td>" for c in row
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _num(value: Any) -> str:
    return format_value(float(value)) if isinstance(value, int | float) else "-"


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)
