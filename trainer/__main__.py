"""`python -m trainer`: train one model from flags and/or a config file, or evaluate a saved one.

    python -m trainer --dataset digits --model resnet20 --epochs 10 --lr 0.1 --batch-size 128
    python -m trainer --config best.json --json       # last stdout line: the metrics as JSON
    python -m trainer --evaluate best/                 # test metrics of an exported model
    python -m trainer --evaluate best/ --amp off       # ... in fp32, whatever it trained in
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from trainer.config import (
    FIELD_NAMES,
    ConfigError,
    TrainConfig,
    coerce,
    field_type,
    with_overrides,
)
from trainer.errors import TrainError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.evaluate:
            from trainer.export import evaluate_saved

            # --device and --amp apply; the rest of the config is the saved model's.
            metrics = evaluate_saved(args.evaluate, device=args.device or "auto", amp=args.amp)
            _print_metrics(metrics, as_json=args.json)
            return 0
        cfg = _config_from(args)
        from trainer.train import train

        quiet = args.json
        result = train(cfg, report=None if quiet else _print_epoch,
                       progress=None if quiet else _ProgressBar())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _print_metrics(result.metrics(), as_json=args.json)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description="Train one ResNet image classifier."
    )
    p.add_argument("--config", type=Path, help="JSON or TOML file of TrainConfig fields")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--evaluate", metavar="DIR",
                   help="evaluate an exported model (dir or best.pt) at its training precision,"
                        " or at --amp's")
    defaults = TrainConfig()
    for name in sorted(FIELD_NAMES):
        flag = "--" + name.replace("_", "-")
        kind = field_type(name)
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {getattr(defaults, name)})")
        else:
            p.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                           help=f"(default {getattr(defaults, name)!r})")
    return p


def _config_from(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        for name, value in _read_config_file(args.config).items():
            try:
                values[name] = coerce(name, value)
            except ConfigError as e:
                # Name the file, so a bad key is not mistaken for a bad flag.
                raise ConfigError(f"--config {str(args.config)!r}: {e}") from None
    values.update({k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None})
    return with_overrides(TrainConfig(), values)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {str(path)!r}: {e.strerror}") from e
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        kind = path.suffix[1:].upper() or "JSON"
        raise ConfigError(f"--config {str(path)!r} is not valid {kind}: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # the output of `hpo best --json` wraps the config with metrics
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a table of TrainConfig fields")
    return data


def _print_metrics(metrics: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics))
        return
    if "single_best" in metrics:  # an ensemble export: its figures beside its best member's
        single = metrics["single_best"]
        print(f"{'':>16}  {'ensemble of ' + str(metrics['members']):>14}  {'single best':>14}")
        for key in ("test_acc", "test_top5", "test_loss", "test_macro_f1"):
            print(f"{key:>16}  {metrics[key]:>14.4f}  {single[key]:>14.4f}")
        print(f"{'checkpoint':>16}  {metrics['checkpoint']}")
        return
    for key in ("val_acc", "val_top5", "val_loss", "best_epoch", "test_acc", "test_top5",
                "test_loss", "test_macro_f1", "images_per_sec", "peak_memory_mb", "checkpoint"):
        if key in metrics:
            value = metrics[key]
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    if metrics.get("stopped_epoch") is not None:
        print(f"{'stopped_epoch':>16}: {metrics['stopped_epoch']} (early stopping)")


def _print_epoch(epoch: int, m: dict[str, Any]) -> None:
    grad = "" if m.get("grad_norm_mean") is None else (
        f"  grad_norm {m['grad_norm_mean']:.3g} (max {m['grad_norm_max']:.3g})")
    print(
        f"epoch {epoch}: train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}"
        f"  val_acc {m['val_acc']:.4f}{grad}  {m['images_per_sec']:.0f} img/s"
        + ("  (early stopping: no better epoch in the patience)" if m.get("early_stop") else ""),
        file=sys.stderr,
    )


class _ProgressBar:
    """One tqdm bar per epoch on stderr."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        from tqdm import tqdm

        if self._bar is None or self._bar.desc != f"epoch {epoch}":
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=steps, desc=f"epoch {epoch}", file=sys.stderr, leave=True)
        self._bar.update(1)
        if step == steps:
            self._bar.close()
            self._bar = None


if __name__ == "__main__":
    sys.exit(main())
