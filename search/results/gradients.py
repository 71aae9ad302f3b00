"""Gradient norms in the report: each trial's per-epoch global gradient norm (mean and max over
the epoch's steps, unscaled and before clipping, as the trainer records them in the trial's
`epochs` attribute), and each trial's mean norm grouped by model depth.

The depth plot shows what the trials of a search did, not a controlled comparison: trials of
different depths differ in their other parameters too (learning rate, width, the epochs they
trained before a pruner stopped them), and the page says so.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.colors import qualitative

from search.db.attrs import GRAD_NORM

EPOCHS = "epochs"  # trial user attr: the per-epoch metrics (search/runtime/objective.py)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def epoch_norms(trial: FrozenTrial) -> list[tuple[int, float, float]]:
    """(epoch, mean, max) of each recorded epoch with gradient norms, in epoch order."""
    out = []
    for h in trial.user_attrs.get(EPOCHS) or []:
        if isinstance(h, dict) and h.get("grad_norm_mean") is not None \
                and h.get("grad_norm_max") is not None:
            out.append((int(h["epoch"]), float(h["grad_norm_mean"]), float(h["grad_norm_max"])))
    return sorted(out)


def trial_norm(trial: FrozenTrial) -> float | None:
    """A trial's mean gradient norm over the epochs it trained: the complete trial's summary
    (every epoch, resumed ones too), else the mean over its recorded epochs; None without."""
    summary = trial.user_attrs.get(GRAD_NORM)
    if isinstance(summary, dict) and summary.get("mean") is not None:
        return float(summary["mean"])
    norms = epoch_norms(trial)
    return sum(m for _, m, _ in norms) / len(norms) if norms else None


def curves_figure(trials: list[FrozenTrial], title: str) -> go.Figure | None:
    """One line per trial: its epochs' mean gradient norm, with the max dotted beside it (one
    legend entry toggles both); None when no trial recorded one."""
    fig = go.Figure()
    palette = qualitative.Plotly
    drawn = 0
    for t in sorted(trials, key=lambda t: t.number):
        norms = epoch_norms(t)
        if not norms:
            continue
        color = palette[drawn % len(palette)]
        drawn += 1
        epochs = [e for e, _, _ in norms]
        group = f"#{t.number}"
        fig.add_trace(go.Scatter(
            x=epochs, y=[m for _, m, _ in norms], mode="lines+markers", name=group,
            legendgroup=group, line={"color": color},
            hovertemplate=f"trial {group} epoch %{{x}}: mean %{{y:.4g}}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=epochs, y=[x for _, _, x in norms], mode="lines", name=f"{group} max",
            legendgroup=group, showlegend=False, line={"color": color, "dash": "dot"},
            hovertemplate=f"trial {group} epoch %{{x}}: max %{{y:.4g}}<extra></extra>"))
    if not drawn:
        return None
    fig.update_layout(title=title, height=420, xaxis={"title": "epoch"},
                      yaxis={"title": "gradient norm (solid: mean, dotted: max)", "type": "log"})
    return fig


def depth_figure(trials: list[tuple[str, FrozenTrial]]) -> go.Figure | None:
    """Each finished trial's mean gradient norm as a point, grouped by its model (shallowest
    first), a box per model; `trials` are (stage, trial). None when no trial recorded one."""
    by_model: dict[str, list[tuple[str, float]]] = {}
    for stage, t in trials:
        norm = trial_norm(t) if t.state in FINISHED else None
        model = _model(t)
        if norm is None or model is None:
            continue
        by_model.setdefault(model, []).append((f"{stage} #{t.number}", norm))
    if not by_model:
        return None
    fig = go.Figure()
    for model in sorted(by_model, key=_depth):
        points = by_model[model]
        fig.add_trace(go.Box(
            y=[v for _, v in points], name=model, text=[label for label, _ in points],
            boxpoints="all", jitter=0.4, pointpos=0,
            hovertemplate="%{text}: %{y:.4g}<extra>" + model + "</extra>"))
    fig.update_layout(title="Mean gradient norm (before clipping) by model depth", height=420,
                      showlegend=False, xaxis={"title": "model (shallowest first)"},
                      yaxis={"title": "trial's mean gradient norm", "type": "log"})
    return fig


def _model(trial: FrozenTrial) -> str | None:
    config: Any = trial.user_attrs.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return str(model) if model else None


def _depth(model: str) -> tuple[int, str]:
    digits = model.removeprefix("resnet")
    return (int(digits) if digits.isdigit() else 1 << 30, model)
