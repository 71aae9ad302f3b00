"""`hpo`: create a staged study, run workers, and read the results.

    hpo create --space spaces/cifar10-resnet.toml --study c10
    hpo worker --study c10 [--device cuda:0]
    hpo run --space spaces/digits-quick.toml --workers 2
    hpo status c10 | hpo best c10 --json | hpo report c10 --out r.html | hpo export c10 --out best/
    hpo export c10 --top 3 --format onnx --out top3/ | hpo serve c10 [--top 3] [--runtime onnx]
    hpo dashboard c10

Every user error is one line on stderr and exit status 2; nothing is written before the input has
been checked. Each command imports what it needs when it runs (functions' imports here): `hpo
status` should not pay for the worker, plotly or torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.artifacts import ArtifactsError, open_artifacts
from search.db import pipeline
from search.db.storage import StorageError, open_storage, redact, resolve_url
from search.space.spec import Pipeline, SpaceError, check_data, load_space
from trainer.contract import MAX_DROP, ConfigError, NoFreeDevice

if TYPE_CHECKING:
    from search.db.winner import Evaluate
    from search.runtime.objective import Train

DEFAULT_ARTIFACTS = "hpo-artifacts"
USER_ERRORS = (SpaceError, StorageError, pipeline.PipelineError, ConfigError, ArtifactsError)


def main(
    argv: list[str] | None = None, *, train: Train | None = None, test: Evaluate | None = None
) -> int:
    """`hpo ARGV`. `train` and `test` replace the trainer of `hpo worker` (the load tests'
    stub): its training, and its evaluation of the winner on the test split."""
    try:
        parser = _parser()  # reads defaults from the environment, HPO_THREADS and others
    except USER_ERRORS as e:
        print(f"hpo: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.trainer = {k: v for k, v in (("train", train), ("test", test)) if v is not None}
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"hpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hpo status x | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpo", description="Staged hyperparameter search for ResNets.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--storage", help="database URL (default: $HPO_STORAGE, else sqlite:///hpo.db)")
        c.set_defaults(func=func)
        return c

    c = command("create", "store a pipeline and create its stage studies", _create)
    c.add_argument("--space", required=True, type=Path, help="search-space TOML file")
    c.add_argument("--study", help="study name (default: the space file's name)")
    _data_check_flag(c)

    c = command("worker", "pull and train trials until the pipeline is done", _worker)
    c.add_argument("--study", required=True)
    _worker_flags(c)
    c.add_argument("--stopped-exit-code", type=int, default=_env_int("HPO_STOPPED_EXIT_CODE"),
                   help="exit status after SIGTERM/SIGINT handed a trial back while the search"
                        " is not done (default: $HPO_STOPPED_EXIT_CODE, else 0; the Kubernetes"
                        " Job sets 143 so that a stopped pod is replaced, not taken for the end"
                        " of the queue)")

    c = command("run", "create a study and run local workers to the end", _run)
    c.add_argument("--space", required=True, type=Path)
    c.add_argument("--study", help="study name (default: the space file's name)")
    c.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1); with --device auto, more workers than"
                        " GPUs share them, ceil(workers/GPUs) per GPU, each capped at its share"
                        " of the GPU's memory")
    c.add_argument("-v", "--verbose", action="store_true", help="per-epoch lines on screen too")
    _worker_flags(c)
    _data_check_flag(c)

    c = command("status", "stages, trials by state, best so far, workers; no STUDY: list", _status)
    c.add_argument("study", nargs="?")
    c.add_argument("--json", action="store_true")
    c.add_argument("--watch", action="store_true", help="a live view until the search ends")
    command("list", "the studies in the storage: state, best value, last activity",
            _commands("list_studies"))

    c = command("best", "the winning parameters by stage, and the metrics", _best)
    c.add_argument("study")
    c.add_argument("--json", action="store_true")
    c.add_argument("--all", action="store_true", help="every field of the configuration")

    c = command("delete", "remove a study: stage studies, rows, artifacts", _commands("delete"))
    c.add_argument("study")
    c.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    c.add_argument("--artifacts", default=_default_artifacts(),
                   help="the checkpoint folder or s3://bucket/prefix (default: $HPO_ARTIFACTS)")
    c.add_argument("--keep-objects", action="store_true",
                   help="with an s3:// store, leave the study's objects in the bucket")
    c = command("extend", "raise a stage's budget of trials", _commands("extend"))
    c.add_argument("study")
    c.add_argument("--stage", required=True)
    c.add_argument("--trials", type=int, required=True, help="the new budget")
    c = command("enqueue", "queue a configuration the next free worker trains first",
                _commands("enqueue"))
    c.add_argument("study")
    c.add_argument("--stage", required=True)
    c.add_argument("--params", required=True, help='JSON, e.g. \'{"lr": 0.1}\'')

    c = command("report", "a self-contained HTML report with plots", _report)
    c.add_argument("study")
    c.add_argument("--out", type=Path, required=True)

    c = command("export", "the best trial's (or top K's) weights and config, loadable by the"
                          " trainer, optionally as TorchScript/ONNX", _export)
    c.add_argument("study")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--artifacts", default=_default_artifacts(),
                   help="the workers' checkpoints: folder or s3://bucket/prefix")
    _top_flag(c, "an ensemble averaging their softmax")
    c.add_argument("--format", default="pytorch",
                   help="pytorch (always written), torchscript, onnx, comma-separated, or all")
    c.add_argument("--quantize", choices=("int8",),
                   help="also write model.int8.onnx (static int8, calibrated on the train split;"
                        " implies onnx) and print its test accuracy beside fp32's")
    c.add_argument("--max-accuracy-drop", type=float, default=MAX_DROP,
                   help="refuse the int8 model if it loses more test accuracy than this"
                        f" fraction (default {MAX_DROP}: one point)")

    c = command("serve", "a prediction web page and JSON API for the best trial(s)", _serve)
    c.add_argument("study")
    c.add_argument("--artifacts", default=_default_artifacts(),
                   help="the workers' checkpoints: folder or s3://bucket/prefix")
    _top_flag(c, "served as an ensemble")
    from trainer.serve import add_flags

    add_flags(c)

    c = command("dashboard", "optuna-dashboard on this storage, on 127.0.0.1", _dashboard)
    c.add_argument("study", nargs="?", help="only used to print its address")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8080)
    c.add_argument("--artifacts", default=_default_artifacts(),
                   help="the workers' checkpoints: folder or s3://bucket/prefix")
    return p


def _commands(name: str) -> Any:
    """A handler in search/commands.py, imported when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        from search import commands

        return int(getattr(commands, name)(args))

    return handler


def _data_check_flag(c: argparse.ArgumentParser) -> None:
    c.add_argument("--no-data-check", dest="check_data", action="store_false",
                   help="do not check that the dataset can be read here (when only the workers'"
                        " machines have it)")


def _worker_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("--device", default=os.environ.get("HPO_DEVICE", "auto"),
                   help="auto | cpu | cuda | cuda:N | cuda:free[:K] (claim a GPU slot no other"
                        " worker on this host holds; K workers share each GPU, each capped at 1/K"
                        " of its memory; K defaults to $HPO_WORKERS_PER_GPU, else 1; default:"
                        " $HPO_DEVICE, else auto)")
    c.add_argument("--artifacts", default=_default_artifacts(),
                   help="checkpoints: a folder all workers share, or s3://bucket/prefix"
                        f" (default: $HPO_ARTIFACTS, else ./{DEFAULT_ARTIFACTS})")
    c.add_argument("--threads", type=int, default=_env_int("HPO_THREADS"),
                   help="CPU threads for PyTorch (default: all)")
    c.add_argument("--fault", default=os.environ.get("HPO_FAULT", ""), help=argparse.SUPPRESS)


def _env_int(name: str) -> int:
    """An integer from the environment; unset or empty (a compose default) means 0."""
    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else 0
    except ValueError:
        raise pipeline.PipelineError(f"{name}={text!r} is not a whole number") from None


def _default_artifacts() -> str:
    return os.environ.get("HPO_ARTIFACTS") or DEFAULT_ARTIFACTS


def _study_name(args: argparse.Namespace) -> str:
    return args.study or args.space.stem


def _checked_space(args: argparse.Namespace) -> Pipeline:
    """The space file, parsed and checked, and its data readable: before anything touches the
    database."""
    pipe = load_space(args.space)
    if args.check_data:
        check_data(pipe)
    pipeline.check_study_name(_study_name(args))
    return pipe


def _create(args: argparse.Namespace) -> int:
    pipe = _checked_space(args)
    name = _study_name(args)
    url = resolve_url(args.storage)
    storage = open_storage(url, create_schema=True)
    created = pipeline.create(storage, name, pipe, str(args.space))
    print(f"{'created' if created else 'exists, unchanged:'} study {name!r} with stages"
          f" {', '.join(s.name for s in pipe.stages)} at {redact(url)}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from search.runtime.worker import Worker

    if not 0 <= args.stopped_exit_code <= 255:
        raise pipeline.PipelineError(
            f"--stopped-exit-code {args.stopped_exit_code}: an exit status is 0 to 255")
    _set_threads(args.threads)
    store = open_artifacts(args.artifacts)
    store.check()
    try:
        worker = Worker.open(resolve_url(args.storage), args.study, device=args.device,
                             artifacts=store, fault=args.fault,
                             stopped_exit_code=args.stopped_exit_code, **args.trainer)
    except ConfigError as e:
        if not isinstance(e, NoFreeDevice):
            raise
        # More workers than GPUs: this one has nothing to do. Exit 0 so a restart policy does
        # not start it again and again.
        print(f"hpo: {e}; this worker exits", file=sys.stderr)
        return 0
    return worker.run()


def _set_threads(threads: int) -> None:
    if threads <= 0:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        # torch sizes its thread pool from OMP_NUM_THREADS when it is first imported: a worker
        # imports it with its first trial, not at start-up (search/runtime/objective.py, `train`).
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise pipeline.PipelineError(f"--workers must be at least 1, not {args.workers}")
    pipe = _checked_space(args)
    name = _study_name(args)
    store = open_artifacts(args.artifacts)
    url = resolve_url(args.storage)
    store.check()
    from search import commands

    commands.quiet_optuna()  # its INFO lines go to the workers' log, not between the view's
    pipeline.create(open_storage(url, create_schema=True), name, pipe, str(args.space))
    return commands.run(args, url, name, store)


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    storage = open_storage(resolve_url(args.storage))
    return storage, pipeline.load(storage, args.study)


def _status(args: argparse.Namespace) -> int:
    from search import commands
    from search.results.status import print_status, status_dict

    if args.study is None:
        return commands.list_studies(args)
    if args.watch:
        return commands.watch(args)
    storage, pipe = _open(args)
    if args.json:
        print(json.dumps(status_dict(storage, args.study, pipe), indent=2))
    else:
        print_status(storage, args.study, pipe)
    return 0


def _best(args: argparse.Namespace) -> int:
    from search import commands
    from search.results.best import best

    if not args.json:
        return commands.best(args)
    storage, pipe = _open(args)
    print(json.dumps(best(storage, args.study, pipe), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from search.results.report import write_report

    storage, pipe = _open(args)
    write_report(storage, args.study, pipe, args.out)
    print(f"wrote {args.out}")
    return 0


def _top_flag(c: argparse.ArgumentParser, what: str) -> None:
    c.add_argument("--top", type=int, default=1, help=f"the K best trials, {what} (default 1)")


def _export(args: argparse.Namespace) -> int:
    from search.results.serve import export

    return export(*_open(args), args)


def _serve(args: argparse.Namespace) -> int:
    from search.results.serve import serve

    return serve(*_open(args), args)


def _dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    store = open_artifacts(args.artifacts)
    storage = open_storage(resolve_url(args.storage))
    if args.study:
        pipeline.load(storage, args.study)  # an unknown study is an error, not an empty page
    store.check()
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard/ (Ctrl-C to stop)",
          flush=True)
    optuna_dashboard.run_server(
        storage, host=args.host, port=args.port,
        artifact_store=store.optuna_store(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
