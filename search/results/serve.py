"""Using a study's winners: `hpo export STUDY [--top K] [--format ...]` and `hpo serve STUDY`.

The pipeline's winner (K = 1: `search.db.winner`, the confirmed one when a confirmation stage
ran), or its top-K complete trials ranked by the pipeline's metric (K > 1: an ensemble averaging
their softmax), become one export or a running prediction service. Exporting the winner reports
its test metrics, evaluated once for the pipeline and stored. The model code lives in trainer/
(bundle, portable, serve); this module only finds the trials and their checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.artifacts import open_artifacts
from search.db import pipeline, winner
from search.results.best import best_checkpoint
from search.space.spec import Pipeline


def top_trials(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline,
               k: int) -> list[dict[str, Any]]:
    """The k best complete trials over every stage, best first: study, stage, trial, value,
    checkpoint. Fewer than k complete trials is an error, not a smaller ensemble."""
    if k < 1:
        raise pipeline.PipelineError(f"--top must be at least 1, not {k}")
    if k == 1:
        won = winner.find(storage, name, pipe)
        if won is None:
            raise pipeline.PipelineError(f"study {name!r} has no complete trial yet")
        stage, trial, _ = won
        return [{"study": name, "stage": stage.name, "trial": trial.number, "value": trial.value,
                 "checkpoint": trial.user_attrs.get("checkpoint", "")}]
    found = []
    for index, stage in enumerate(pipe.stages):
        study = pipeline.load_stage_study(storage, name, stage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.value is not None:
                found.append({"study": name, "stage": stage.name, "trial": t.number,
                              "value": t.value, "checkpoint": t.user_attrs.get("checkpoint", ""),
                              "order": (index, t.number)})
    if not found:
        raise pipeline.PipelineError(f"study {name!r} has no complete trial yet")
    if len(found) < k:
        raise pipeline.PipelineError(
            f"--top {k}: study {name!r} has only {len(found)} complete trial(s)")
    sign = -1.0 if pipe.direction == "maximize" else 1.0
    # Ties (equal validation accuracy is common on small splits) go to the earlier trial.
    found.sort(key=lambda t: (sign * t["value"], t["order"]))
    return found[:k]


def _checkpoints(trials: list[dict[str, Any]], artifacts: str
                 ) -> tuple[list[Path], list[dict[str, Any]]]:
    store = open_artifacts(artifacts)
    # Every file is found (or fetched from the object store) before any is read.
    paths = [best_checkpoint(t, store) for t in trials]
    return paths, [{k: t[k] for k in ("study", "stage", "trial", "value")} for t in trials]


def export(storage: optuna.storages.RDBStorage, pipe: Pipeline, args: argparse.Namespace) -> int:
    from trainer.export import export_bundle
    from trainer.portable import parse_formats

    formats = parse_formats(args.format)
    trials = top_trials(storage, args.study, pipe, args.top)
    paths, members = _checkpoints(trials, args.artifacts)
    out, checks = export_bundle(paths, args.out, members, formats, args.quantize,
                                args.max_accuracy_drop)
    what = (f"trial {members[0]['trial']} of stage {members[0]['stage']!r}" if len(members) == 1
            else "an ensemble of trials " + ", ".join(f"{m['stage']}#{m['trial']}"
                                                     for m in members))
    print(f"exported {what} to {out}")
    if args.top == 1:
        test = winner.test_once(storage, args.study, pipe, open_artifacts(args.artifacts))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (test or {}).items()
                          if k.startswith("test_") and isinstance(v, float))
        print(f"  test (evaluated once, for the winner): {shown}")
    for name, c in checks.items():
        if name == "int8":
            print(f"  {c['file']}: {quantized_line(c)} [int8]")
            continue
        print(f"  {c['file']}: matches PyTorch on {c['images']} test images (largest probability"
              f" difference {c['max_abs_diff']:.1e}, tolerance {c['tolerance']:.0e}; top-1"
              f" agrees on {c['top1_agree']}) [{name}]")
    print(f"test it with `python -m trainer --evaluate {out}`; serve it with"
          f" `python -m trainer.serve {out}`")
    return 0


def serve(storage: optuna.storages.RDBStorage, pipe: Pipeline, args: argparse.Namespace) -> int:
    from trainer.bundle import from_checkpoints
    from trainer.serve import check_batching, check_threshold, start

    check_threshold(args.threshold)
    check_batching(args.max_batch, args.batch_wait_ms)
    paths, members = _checkpoints(top_trials(storage, args.study, pipe, args.top),
                                  args.artifacts)
    bundle = from_checkpoints(paths, members)
    model = None
    if args.runtime == "int8":
        from trainer import checkpoint
        from trainer.portable import onnx_bytes
        from trainer.quantize import CALIBRATION_IMAGES, calibrated
        from trainer.saved_model import saved_config

        # As `hpo export --quantize int8` calibrates, but unchecked: the export measures the
        # int8 model's test accuracy (once) and refuses one that loses too much.
        cfg = saved_config(checkpoint.load(paths[0]))
        model = calibrated(onnx_bytes(bundle.module), cfg)
        print(f"quantized to int8 on {CALIBRATION_IMAGES} train images (not checked: `hpo"
              " export --quantize int8` measures its test accuracy)", flush=True)
    return start(bundle, args, model)


def quantized_line(c: dict[str, Any]) -> str:
    """The int8 check of an export as one line: both accuracies, agreement, both sizes."""
    return (f"test accuracy {100 * c['int8_test_accuracy']:.2f}% int8 against"
            f" {100 * c['fp32_test_accuracy']:.2f}% fp32 on {c['images']} test images (top-1"
            f" agrees on {c['top1_agree']}); {c['int8_bytes'] / 1e6:.2f} MB against"
            f" {c['fp32_bytes'] / 1e6:.2f} MB fp32 ({c['fp32_bytes'] / c['int8_bytes']:.1f}x"
            " smaller)")
