"""Property tests of space parsing: any input gives a Pipeline or a SpaceError, never another
exception; any valid pipeline round-trips through JSON and samples inside its own bounds."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.space.params import PARAM_KEYS
from search.space.spec import (
    STAGE_KEYS,
    TOP_KEYS,
    CategoricalParam,
    FloatParam,
    IntParam,
    Pipeline,
    SpaceError,
    base_config,
    distribution,
    load_space,
    parse_space,
)
from trainer.config import FIELD_NAMES, TrainConfig, with_overrides

SPACES = Path(__file__).resolve().parents[2] / "spaces"
SHIPPED_TEXT = [p.read_text() for p in sorted(SPACES.glob("*.toml"))]
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

optuna.logging.set_verbosity(optuna.logging.WARNING)

# --- garbage: TOML-ish values under mostly-real keys ---

WORDS = ["digits", "cifar10", "imagefolder:x", "resnet20", "resnet7", "sgd", "adamw", "auto",
         "best:a", "best:b", "a", "b", "", "val_acc", "val_loss", "nan@3", "oom>4"]
DATASETS = ["digits", "cifar10", "imagefolder:x"]
KEYS = sorted(set(TOP_KEYS) | set(STAGE_KEYS) | set(PARAM_KEYS) | FIELD_NAMES
              | {"startup_trials", "warmup_epochs", "x"})
scalars = st.one_of(
    st.booleans(), st.integers(-5, 300), st.integers(), st.floats(), st.sampled_from(WORDS),
    st.text(max_size=4), st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=25,
)


def parse_or_refuse(data: Any) -> Pipeline | None:
    try:
        pipeline = parse_space(data, "fuzz.toml")
    except SpaceError as err:
        assert str(err).startswith("fuzz.toml: ")
        return None
    check_valid(pipeline)
    return pipeline


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_garbage_dicts_give_a_pipeline_or_a_space_error(data: dict[str, Any]) -> None:
    parse_or_refuse(data)


# --- text: random and mutated shipped files, through a real file ---

TOKENS = ["=", "[", "]", "{", "}", ",", '"', "\n", "[[stage]]", "-1", "1e400", "nan", "true",
          "0", "0.5", "x", "#", "low", "high", "choices", "\\", "\x00", "é"]


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SHIPPED_TEXT))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 12))
        text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at + cut:]
    return text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "space.toml"


@FUZZ
@given(text=st.one_of(st.text(max_size=200), mutated_text()))
def test_any_text_gives_a_pipeline_or_a_space_error(scratch: Path, text: str) -> None:
    scratch.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        pipeline = load_space(scratch)
    except SpaceError as err:
        assert str(err).startswith(f"{scratch}: ")
        return
    check_valid(pipeline)


# --- valid pipelines: round trip, legal base configs, sampling inside the bounds ---

FLOAT_FIELDS = {  # field: (lowest legal, highest legal) used to draw ranges inside the field
    "lr": (1e-4, 2.0), "momentum": (0.0, 0.99), "weight_decay": (0.0, 0.1),
    "dropout": (0.0, 0.9), "label_smoothing": (0.0, 0.5), "warmup_epochs": (0.0, 5.0),
    "width": (0.25, 4.0), "kd_temperature": (0.5, 10.0), "jitter": (0.0, 1.0),
    "grad_clip": (0.0, 10.0),
}
INT_FIELDS = {"batch_size": (1, 512), "seed": (0, 10_000), "se_reduction": (1, 64),
              "crop_pad": (-1, 8)}
CHOICE_FIELDS = {"model": ["resnet20", "resnet32", "resnet56", "resnet18", "resnet50"],
                 "optimizer": ["sgd", "nesterov", "adamw"], "se": [False, True],
                 "hflip": [False, True], "lr_per_256": [False, True]}


@st.composite
def good_param(draw: st.DrawFn, name: str) -> dict[str, Any]:
    if name in CHOICE_FIELDS:
        return {"choices": draw(st.lists(st.sampled_from(CHOICE_FIELDS[name]), min_size=1,
                                         unique=True))}
    if name in INT_FIELDS:
        lo, hi = INT_FIELDS[name]
        low = draw(st.integers(max(lo, 1), hi - 1))
        step = draw(st.integers(1, 8))
        table: dict[str, Any] = {"low": low, "high": low + step * draw(st.integers(1, 20))}
        if draw(st.booleans()):
            table["log"] = True
        elif step > 1 or draw(st.booleans()):
            table["step"] = step
        if table["high"] > hi:
            table = {"choices": [low, hi]} if low != hi else {"choices": [low]}
        return table
    lo, hi = FLOAT_FIELDS[name]
    if draw(st.booleans()):  # a grid, written as decimals the way a person would
        step = draw(st.sampled_from([x for x in (0.01, 0.05, 0.1, 0.25) if 2 * x <= hi - lo]))
        low = round(draw(st.integers(0, int((hi - lo) / step) - 1)) * step + lo, 6)
        high = round(low + step * draw(st.integers(1, 10)), 6)
        if high > hi:
            high = round(low + step, 6)
        return {"low": low, "high": high, "step": step}
    low = draw(st.floats(max(lo, 1e-4), hi / 2))
    high = draw(st.floats(low * 1.001 + 1e-6, hi))  # legal ranges are not rounding noise
    return {"low": low, "high": high, "log": draw(st.booleans())}


@st.composite
def good_spaces(draw: st.DrawFn) -> dict[str, Any]:
    """Legal spaces of one to four stages, some distilling from an earlier stage."""
    names = ["opt", "arch", "reg", "final"][: draw(st.integers(1, 4))]
    searchable = sorted(set(FLOAT_FIELDS) | set(INT_FIELDS) | set(CHOICE_FIELDS))
    stages: list[dict[str, Any]] = []
    distilled = False
    for index, name in enumerate(names):
        fields = draw(st.lists(st.sampled_from(searchable), max_size=4, unique=True))
        stage: dict[str, Any] = {
            "name": name,
            "trials": draw(st.integers(1, 50)),
            "epochs": draw(st.integers(1, 30)),
            "params": {f: draw(good_param(f)) for f in fields},
        }
        fixed = draw(st.lists(st.sampled_from(sorted(CHOICE_FIELDS)), max_size=2, unique=True))
        stage["fixed"] = {f: draw(st.sampled_from(CHOICE_FIELDS[f])) for f in fixed
                          if f not in stage["params"]}
        if index and draw(st.booleans()):
            stage["teacher"] = f"best:{draw(st.sampled_from(names[:index]))}"
            stage["params"]["kd_alpha"] = {"low": 0.0, "high": draw(st.floats(0.1, 1.0))}
            distilled = True
        elif distilled and draw(st.booleans()):
            stage["fixed"]["kd_alpha"] = 0.0  # distillation off again after a distilling stage
        counts = st.integers(0, 20)
        if draw(st.booleans()):
            stage["pruner"] = draw(st.fixed_dictionaries(
                {}, optional={"startup_trials": counts, "warmup_epochs": counts}))
        if draw(st.booleans()):
            stage["sampler"] = {"startup_trials": draw(counts)}
        stages.append(stage)
    return {"dataset": draw(st.sampled_from(["digits", "cifar10", "synthetic", "imagefolder:d"])),
            "metric": draw(st.sampled_from(["val_acc", "val_top5", "val_loss"])),
            "fixed": {"crop_pad": 1} if draw(st.booleans()) else {},
            "stage": stages}


# --- near-valid: a legal space with a few things broken ---


@st.composite
def near_spaces(draw: st.DrawFn) -> dict[str, Any]:
    """A legal space with one to three things broken anywhere in the nesting: a value swapped
    for garbage, a key dropped, or a key added."""
    data = copy.deepcopy(draw(good_spaces()))
    rng = draw(st.randoms(use_true_random=False))  # spreads the damage evenly over the tree
    for _ in range(rng.randint(1, 3)):
        node, key = rng.choice(list(slots(data)))
        action = rng.choice(["replace", "drop", "add"])
        if action == "replace":
            node[key] = draw(values)
        elif action == "drop":
            del node[key]
        elif isinstance(node, dict):
            node[draw(st.sampled_from(KEYS))] = draw(values)
        else:
            node.append(draw(values))
    return data


def slots(node: Any) -> Any:
    """(container, key) for every value inside `node`, at any depth."""
    keys = list(node) if isinstance(node, dict) else range(len(node))
    for key in keys:
        yield node, key
        if isinstance(node[key], dict | list) and node[key]:
            yield from slots(node[key])


def check_valid(pipeline: Pipeline) -> None:
    """What every pipeline that parsed must satisfy."""
    again = Pipeline.from_json(pipeline.to_json())
    assert again == pipeline and again.to_json() == pipeline.to_json()
    assert again.digest() == pipeline.digest()
    for stage in pipeline.stages:
        base = base_config(pipeline, stage, {})
        if stage.teacher:
            base["teacher"] = "teacher.pt"
        with_overrides(TrainConfig(), base)
        for param in stage.params.values():
            distribution(param)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(good_spaces(), st.integers(0, 2**32 - 1))
def test_valid_pipelines_parse_round_trip_and_sample_inside_their_bounds(
    data: dict[str, Any], seed: int
) -> None:
    pipeline = parse_space(data, "good.toml")  # every drawn space is legal: must not be refused
    check_valid(pipeline)
    for stage in pipeline.stages:
        if not stage.params:
            continue
        dists = {name: distribution(p) for name, p in stage.params.items()}
        for sampler in (optuna.samplers.RandomSampler(seed=seed),
                        optuna.samplers.TPESampler(n_startup_trials=1, seed=seed)):
            sample_inside(stage.params, dists, sampler)


def sample_inside(params: dict[str, Any], dists: dict[str, Any],
                  sampler: optuna.samplers.BaseSampler) -> None:
    study = optuna.create_study(sampler=sampler)
    for value in (0.0, 1.0, 0.5):
        trial = study.ask(dists)
        for name, got in trial.params.items():
            assert_inside(params[name], got)
            assert dists[name]._contains(dists[name].to_internal_repr(got))
        study.tell(trial, value)


def assert_inside(param: FloatParam | IntParam | CategoricalParam, value: Any) -> None:
    if isinstance(param, CategoricalParam):
        assert value in param.choices
        return
    assert param.low <= value <= param.high
    if isinstance(param, IntParam):
        assert isinstance(value, int) and (value - param.low) % param.step == 0
    elif param.step is not None:
        k = (value - param.low) / param.step
        assert math.isclose(k, round(k), abs_tol=1e-6)


@FUZZ
@given(near_spaces())
def test_near_valid_dicts_give_a_pipeline_or_a_space_error(data: dict[str, Any]) -> None:
    parse_or_refuse(data)
