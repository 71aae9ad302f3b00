"""Space files: the shipped ones load, every rule refuses its own bad example with a message that
names the file, the stage and the field, and the stored JSON form round-trips exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.space.spec import (
    MAX_BYTES,
    CategoricalParam,
    FloatParam,
    IntParam,
    Pipeline,
    Pruner,
    Sampler,
    SpaceError,
    Stage,
    base_config,
    distribution,
    load_space,
    parse_space,
)
from trainer.config import FIELD_NAMES, TrainConfig, with_overrides

SPACES = Path(__file__).resolve().parents[2] / "spaces"
SHIPPED = sorted(SPACES.glob("*.toml"))


def space(*, top: str = "", name: str = "optimizer", trials: str = "4", epochs: str = "3",
          stage: str = "", params: str = "", later: str = "") -> str:
    """A small valid space with one line swapped or added where a case needs it."""
    return f"""dataset = "digits"
{top}
[[stage]]
name = "{name}"
trials = {trials}
epochs = {epochs}
{stage}
[stage.params]
lr = {{ low = 0.01, high = 0.5, log = true }}
{params}
{later}"""


ARCH = """
[[stage]]
name = "architecture"
trials = 2
epochs = 3
[stage.params]
width = { choices = [0.5, 1.0] }
"""
KD_ALPHA = "kd_alpha = { low = 0.1, high = 0.9 }\nwidth = {"
DISTIL = ARCH.replace("[stage.params]", 'teacher = "best:optimizer"\n[stage.params]').replace(
    "width = {", KD_ALPHA)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


# (case id, file text, fragments the message must contain besides the file's path)
BAD = [
    ("broken toml", 'dataset = "digits"\n[[stage]\nname = "x"\n', ["not valid TOML", "line 2"]),
    ("not utf-8", None, ["not UTF-8"]),
    ("unknown top key", space(top='datset = "digits"'), ["datset", "unknown key"]),
    ("missing dataset", space().replace('dataset = "digits"', ""), ["dataset", "missing"]),
    ("bad dataset", space().replace('"digits"', '"mnist"', 1), ["dataset", "mnist"]),
    ("bad metric", space(top='metric = "accuracy"'), ["metric", "accuracy", "val_acc"]),
    ("no stages", 'dataset = "digits"\n', ["stage", "at least one"]),
    ("stage not array", 'dataset = "digits"\n[stage]\nname = "a"\n', ["stage", "[[stage]]"]),
    ("unknown fixed field", space(top='[fixed]\nmodle = "resnet20"'),
     ["fixed.modle", "did you mean model"]),
    ("fixed illegal value", space(top='[fixed]\nmodel = "resnet7"'), ["fixed.model", "resnet7"]),
    ("fixed wrong type", space(top="[fixed]\nbatch_size = 64.0"),
     ["fixed.batch_size", "expected an integer"]),
    ("fixed dataset", space(top='[fixed]\ndataset = "digits"'), ["fixed.dataset", "top-level"]),
    ("fixed device", space(top='[fixed]\ndevice = "cuda"'), ["fixed.device", "worker"]),
    ("unknown stage key", space(stage="trails = 4"),
     ["stage 'optimizer'", "trails", "did you mean trials"]),
    ("unknown pruner key", space(stage="pruner = { startup = 3 }"),
     ["stage 'optimizer'", "pruner.startup", "unknown key"]),
    ("unknown sampler key", space(stage="sampler = { n_startup_trials = 3 }"),
     ["stage 'optimizer'", "sampler.n_startup_trials", "unknown key"]),
    ("negative pruner warmup", space(stage="pruner = { warmup_epochs = -1 }"),
     ["stage 'optimizer'", "pruner.warmup_epochs", "at least 0"]),
    ("sampler not a table", space(stage="sampler = 3"), ["stage 'optimizer'", "sampler"]),
    ("unknown param key", space(params='momentum = { low = 0.8, high = 0.9, scale = "log" }'),
     ["stage 'optimizer'", "params.momentum", "unknown key scale"]),
    ("unknown field", space(params="momentm = { low = 0.8, high = 0.9 }"),
     ["stage 'optimizer'", "params.momentm", "did you mean momentum"]),
    ("low above high", space(params="momentum = { low = 0.9, high = 0.8 }"),
     ["stage 'optimizer'", "params.momentum", "low (0.9) must be below high (0.8)"]),
    ("low equals high", space(params="momentum = { low = 0.9, high = 0.9 }"),
     ["stage 'optimizer'", "params.momentum", "must be below", "[stage.fixed]"]),
    ("log with low 0", space(params="weight_decay = { low = 0.0, high = 0.1, log = true }"),
     ["stage 'optimizer'", "params.weight_decay", "log = true needs low > 0"]),
    ("log int low 0", space(params="batch_size = { low = 0, high = 64, log = true }"),
     ["stage 'optimizer'", "params.batch_size"]),
    ("nan bound", space(params="momentum = { low = nan, high = 0.9 }"),
     ["stage 'optimizer'", "params.momentum", "low", "nan"]),
    ("inf bound", space(params="weight_decay = { low = 0.0, high = inf }"),
     ["stage 'optimizer'", "params.weight_decay", "high", "inf"]),
    ("bound outside field", space(params="momentum = { low = 0.5, high = 1.5 }"),
     ["stage 'optimizer'", "params.momentum", "high", "outside"]),
    ("range of rounding noise", space(params="momentum = { low = 0.5, high = 0.5000000000000001 }"),
     ["stage 'optimizer'", "params.momentum", "too close"]),
    ("missing high", space(params="momentum = { low = 0.5 }"),
     ["stage 'optimizer'", "params.momentum", "low and high"]),
    ("empty choices", space(params="batch_size = { choices = [] }"),
     ["stage 'optimizer'", "params.batch_size", "empty"]),
    ("duplicate choices", space(params="batch_size = { choices = [32, 64, 32] }"),
     ["stage 'optimizer'", "params.batch_size", "32 appears twice"]),
    ("duplicate float choices", space(params="width = { choices = [1, 1.0] }"),
     ["stage 'optimizer'", "params.width", "appears twice"]),
    ("choices not a list", space(params="batch_size = { choices = 32 }"),
     ["stage 'optimizer'", "params.batch_size", "expected a list"]),
    ("choices and low", space(params="batch_size = { choices = [32], low = 1 }"),
     ["stage 'optimizer'", "params.batch_size", "cannot be combined"]),
    ("param not a table", space(params="batch_size = [32, 64]"),
     ["stage 'optimizer'", "params.batch_size", "expected a table"]),
    ("illegal choice", space(params='model = { choices = ["resnet20", "resnet7"] }'),
     ["stage 'optimizer'", "params.model", "choices[1]", "resnet7"]),
    ("choice wrong type", space(params='se = { choices = [true, "no"] }'),
     ["stage 'optimizer'", "params.se", "choices[1]", "true or false"]),
    ("int field float bounds", space(params="batch_size = { low = 16.0, high = 128.0 }"),
     ["stage 'optimizer'", "params.batch_size", "low", "expected an integer"]),
    ("int field float choice", space(params="batch_size = { choices = [32, 64.0] }"),
     ["stage 'optimizer'", "params.batch_size", "choices[1]", "expected an integer"]),
    ("int step not int", space(params="batch_size = { low = 16, high = 128, step = 16.0 }"),
     ["stage 'optimizer'", "params.batch_size", "step"]),
    ("int step not dividing", space(params="batch_size = { low = 16, high = 100, step = 16 }"),
     ["stage 'optimizer'", "params.batch_size", "step (16) must divide"]),
    ("float step not dividing", space(params="dropout = { low = 0.0, high = 0.5, step = 0.2 }"),
     ["stage 'optimizer'", "params.dropout", "must divide"]),
    ("step with log", space(params="weight_decay = { low = 1e-5, high = 1e-2, log = true, "
                                   "step = 1e-5 }"),
     ["stage 'optimizer'", "params.weight_decay", "step cannot be combined with log"]),
    ("bool field range", space(params="se = { low = 0, high = 1 }"),
     ["stage 'optimizer'", "params.se", "choices"]),
    ("str field range", space(params="optimizer = { low = 0, high = 2 }"),
     ["stage 'optimizer'", "params.optimizer", "choices"]),
    ("log not bool", space(params='momentum = { low = 0.5, high = 0.9, log = "yes" }'),
     ["stage 'optimizer'", "params.momentum", "log"]),
    ("bool for number", space(params="momentum = { low = true, high = 0.9 }"),
     ["stage 'optimizer'", "params.momentum", "low", "expected a number"]),
    ("string for number", space(params='momentum = { low = "0.5", high = 0.9 }'),
     ["stage 'optimizer'", "params.momentum", "low", "expected a number"]),
    ("searched checkpoint_dir", space(params='checkpoint_dir = { choices = ["a", "b"] }'),
     ["stage 'optimizer'", "params.checkpoint_dir", "worker"]),
    ("searched resume", space(params="resume = { choices = [true, false] }"),
     ["stage 'optimizer'", "params.resume", "worker"]),
    ("searched fault", space(params='fault = { choices = ["", "nan@3"] }'),
     ["stage 'optimizer'", "params.fault", "cannot be searched"]),
    ("searched epochs", space(params="epochs = { low = 1, high = 5 }"),
     ["stage 'optimizer'", "params.epochs", "stage's epochs"]),
    ("stage fixed teacher", space(stage='[stage.fixed]\nteacher = "x.pt"'),
     ["stage 'optimizer'", "fixed.teacher", "best:<stage>"]),
    ("stage fixed and params", space(stage="[stage.fixed]\nlr = 0.1"),
     ["stage 'optimizer'", "params.lr", "also in this stage's fixed"]),
    ("stage fixed illegal", space(stage="[stage.fixed]\nmomentum = 1.0"),
     ["stage 'optimizer'", "fixed.momentum", "outside"]),
    ("patience below zero", space(params="early_stop_patience = { low = -1, high = 3 }"),
     ["stage 'optimizer'", "params.early_stop_patience", "-1", "outside"]),
    ("trials zero", space(trials="0"), ["stage 'optimizer'", "trials", "at least 1"]),
    ("trials string", space(trials='"4"'), ["stage 'optimizer'", "trials", "expected an integer"]),
    ("trials bool", space(trials="true"), ["stage 'optimizer'", "trials", "expected an integer"]),
    ("trials float", space(trials="4.0"), ["stage 'optimizer'", "trials", "expected an integer"]),
    ("epochs zero", space(epochs="0"), ["stage 'optimizer'", "epochs", "outside"]),
    ("epochs float", space(epochs="2.5"), ["stage 'optimizer'", "epochs", "expected an integer"]),
    ("missing trials", space().replace("trials = 4\n", ""), ["stage 'optimizer'", "trials"]),
    ("bad stage name", space(name="opt/imizer"), ["stage #1", "name", "opt/imizer"]),
    ("empty stage name", space(name=""), ["stage #1", "name"]),
    ("duplicate stage name", space(later=ARCH.replace("architecture", "optimizer")),
     ["stage #2", "name", "'optimizer' is already"]),
    ("teacher unknown", space(later=ARCH.replace("[stage.params]", 'teacher = "best:optimiser"\n'
                                                 "[stage.params]")),
     ["stage 'architecture'", "teacher", "no stage named 'optimiser'", "best:optimizer"]),
    ("teacher later", space(stage='teacher = "best:architecture"', later=ARCH),
     ["stage 'optimizer'", "teacher", "runs later"]),
    ("teacher same", space(stage='teacher = "best:optimizer"'),
     ["stage 'optimizer'", "teacher", "itself"]),
    ("teacher no prefix", space(later=ARCH.replace("[stage.params]", 'teacher = "optimizer"\n'
                                                   "[stage.params]")),
     ["stage 'architecture'", "teacher", "best:<earlier stage>"]),
    ("teacher unused", space(later=ARCH.replace("[stage.params]", 'teacher = "best:optimizer"\n'
                                                "[stage.params]")),
     ["stage 'architecture'", "teacher", "kd_alpha is 0"]),
    ("kd_alpha without teacher", space(params="kd_alpha = { low = 0.0, high = 0.5 }"),
     ["stage 'optimizer'", "params.kd_alpha", "teacher", "best:<earlier stage>"]),
    ("kd_alpha in a stage after the teacher", space(
        later=DISTIL + ARCH.replace("architecture", "final").replace("width = {", KD_ALPHA)),
     ["stage 'final'", "params.kd_alpha", "teacher"]),
    ("carried value clashes with a later stage", space(
        top='[fixed]\nmodel = "resnet50"', params='model = { choices = ["resnet50", "resnet20"] }',
        later=ARCH.replace("[stage.params]", '[stage.fixed]\npretrained = "torchvision:'
                                             'IMAGENET1K_V2"\n[stage.params]')),
     ["stage 'architecture'", "params.model (carried from stage 'optimizer')", "'resnet20'",
      "pretrained"]),
    ("torchvision weights on a cifar net", space(
        top='[fixed]\nmodel = "resnet50"\npretrained = "torchvision:IMAGENET1K_V2"',
        params='model = { choices = ["resnet50", "resnet20"] }'),
     ["stage 'optimizer'", "params.model", "'resnet20'", "pretrained"]),
    ("base config broken", space(top='[fixed]\npretrained = "torchvision:IMAGENET1K_V2"'),
     ["stage 'optimizer'", "pretrained", "resnet20"]),
    ("accum_steps does not divide", space(
        top="[fixed]\naccum_steps = 3\nbatch_size = 96",
        params="batch_size = { choices = [96, 128] }"),
     ["stage 'optimizer'", "params.batch_size", "128", "accum_steps"]),
    ("accum_steps in an int range", space(
        top="[fixed]\naccum_steps = 4\nbatch_size = 64",
        params="batch_size = { low = 16, high = 64 }"),
     ["stage 'optimizer'", "params.batch_size", "17", "accum_steps"]),
    ("unfreezing without frozen stages", space(params="unfreeze_every = { low = 0, high = 3 }"),
     ["stage 'optimizer'", "params.unfreeze_every", "1", "freeze_stages"]),
    ("unknown loss", space(params='loss = { choices = ["focal", "dice"] }'),
     ["stage 'optimizer'", "params.loss", "choices[1]", "dice", "cross_entropy"]),
    ("negative focal gamma", space(params="focal_gamma = { low = -1.0, high = 3.0 }"),
     ["stage 'optimizer'", "params.focal_gamma", "low", "outside"]),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_space_is_refused_with_a_message_naming_file_stage_and_field(
    tmp_path: Path, text: str | None, fragments: list[str]
) -> None:
    path = tmp_path / "space.toml"
    if text is None:
        path.write_bytes(space().encode() + b"\n# caf\xe9\n")
    else:
        path.write_text(text)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sorted(tmp_path.iterdir()) == before  # refused without writing anything


def test_a_file_over_one_mib_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text(space() + "#" * MAX_BYTES + "\n")
    with pytest.raises(SpaceError, match=r"too large.*1 MiB") as caught:
        load_space(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_file_or_a_folder_is_a_space_error(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "nope.toml")
    with pytest.raises(SpaceError, match="cannot read it"):
        load_space(tmp_path)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_space_loads_and_round_trips(path: Path) -> None:
    pipeline = load_space(path)
    again = Pipeline.from_json(pipeline.to_json())
    assert again == pipeline
    assert again.to_json() == pipeline.to_json()
    assert load_space(path).digest() == pipeline.digest()
    for stage in pipeline.stages:
        assert set(stage.params) <= FIELD_NAMES
        for param in stage.params.values():
            distribution(param)


def test_shipped_spaces_include_the_three_documented_ones() -> None:
    names = {p.name for p in SHIPPED}
    assert {"digits-quick.toml", "cifar10-resnet.toml", "finetune-imagefolder.toml"} <= names


def test_digits_quick_searches_trainconfig_fields_in_three_stages() -> None:
    pipeline = load_space(SPACES / "digits-quick.toml")
    assert pipeline.dataset == "digits"
    assert pipeline.direction == "maximize"
    assert [s.name for s in pipeline.stages] == ["optimizer", "architecture", "regularization"]
    carried: dict = {}
    for stage in pipeline.stages:
        assert stage.params and set(stage.params) <= FIELD_NAMES
        # the lowest end of every range and the first choice make a config the trainer accepts
        first = {k: p.choices[0] if isinstance(p, CategoricalParam) else p.low
                 for k, p in stage.params.items()}
        with_overrides(TrainConfig(), {**base_config(pipeline, stage, carried), **first})
        carried.update(first)


def test_cifar_last_regularization_stage_distils_from_architecture() -> None:
    pipeline = load_space(SPACES / "cifar10-resnet.toml")
    assert pipeline.stage("regularization-2").teacher == "architecture"
    assert {"kd_alpha", "kd_temperature"} <= set(pipeline.stage("regularization-2").params)
    # The first regularization stage runs before the architecture stage: nothing to distil from.
    assert pipeline.stage("regularization").teacher is None


def test_defaults_and_a_stage_without_params(tmp_path: Path) -> None:
    text = space(later='[[stage]]\nname = "repeat"\ntrials = 2\nepochs = 5\n')
    pipeline = load_space(write(tmp_path, text))
    assert pipeline.metric == "val_acc" and pipeline.direction == "maximize"
    first, repeat = pipeline.stages
    assert first.pruner == Pruner() and first.sampler == Sampler()
    assert repeat.params == {} and repeat.teacher is None and repeat.epochs == 5


def test_kd_alpha_is_carried_with_its_teacher_into_later_stages(tmp_path: Path) -> None:
    text = space(later=DISTIL + ARCH.replace("architecture", "final"))
    final = load_space(write(tmp_path, text)).stage("final")
    assert final.teacher is None and "kd_alpha" not in final.params


def test_val_loss_is_minimized_and_fault_may_be_fixed(tmp_path: Path) -> None:
    text = space(top='metric = "val_loss"\n[fixed]\nfault = "nan@3"')
    pipeline = load_space(write(tmp_path, text))
    assert pipeline.direction == "minimize"
    assert pipeline.fixed == {"fault": "nan@3"}


def test_values_come_back_in_the_field_type(tmp_path: Path) -> None:
    text = space(top="[fixed]\nwidth = 1",
                 params="dropout = { low = 0, high = 0.75, step = 0.25 }\n"
                        "warmup_epochs = { choices = [0, 1.5] }")
    pipeline = load_space(write(tmp_path, text))
    assert pipeline.fixed == {"width": 1.0} and isinstance(pipeline.fixed["width"], float)
    params = pipeline.stages[0].params
    assert params["dropout"] == FloatParam(0.0, 0.75, step=0.25)
    assert params["warmup_epochs"] == CategoricalParam((0.0, 1.5))
    assert all(isinstance(v, float) for v in params["warmup_epochs"].choices)


def test_key_order_and_layout_do_not_change_the_digest(tmp_path: Path) -> None:
    a = load_space(write(tmp_path, space(params="momentum = { low = 0.8, high = 0.9 }\n"
                                                "dropout = { low = 0.0, high = 0.3 }")))
    b = load_space(write(tmp_path, space(params="dropout = {high=0.3,low=0.0}\n"
                                                "momentum = { high = 0.9, low = 0.8 }")))
    c = load_space(write(tmp_path, space(params="dropout = { low = 0.0, high = 0.31 }")))
    assert a.to_json() == b.to_json() and a.digest() == b.digest()
    assert c.digest() != a.digest() and len(a.digest()) == 64


@pytest.mark.parametrize("text", ["", "{", "[]", '{"dataset": "digits"}', '"x"'])
def test_from_json_refuses_garbage_with_a_space_error(text: str) -> None:
    with pytest.raises(SpaceError, match="stored pipeline"):
        Pipeline.from_json(text)


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (FloatParam(0.01, 1.0, log=True), FloatDistribution(0.01, 1.0, log=True)),
        (FloatParam(0.0, 0.3), FloatDistribution(0.0, 0.3)),
        (FloatParam(0.0, 0.5, step=0.1), FloatDistribution(0.0, 0.5, step=0.1)),
        (IntParam(16, 128, step=16), IntDistribution(16, 128, step=16)),
        (IntParam(1, 64, log=True), IntDistribution(1, 64, log=True)),
        (CategoricalParam(("resnet20", "resnet32")),
         CategoricalDistribution(("resnet20", "resnet32"))),
        (CategoricalParam((False, True)), CategoricalDistribution((False, True))),
    ],
)
def test_distribution_maps_each_param_to_its_optuna_distribution(
    param: FloatParam | IntParam | CategoricalParam,
    expected: FloatDistribution | IntDistribution | CategoricalDistribution,
) -> None:
    assert distribution(param) == expected


def test_focal_loss_and_gradual_unfreezing_are_searchable(tmp_path: Path) -> None:
    # unfreeze_every needs frozen stages in every trial: freeze_stages fixed for the stage.
    text = space(stage="[stage.fixed]\nfreeze_stages = 2",
                 params='loss = { choices = ["cross_entropy", "focal"] }\n'
                        "focal_gamma = { low = 0.0, high = 5.0 }\n"
                        "unfreeze_every = { low = 0, high = 3 }")
    stage = load_space(write(tmp_path, text)).stages[0]
    assert stage.params["loss"] == CategoricalParam(("cross_entropy", "focal"))
    assert stage.params["focal_gamma"] == FloatParam(0.0, 5.0)
    assert stage.params["unfreeze_every"] == IntParam(0, 3)
    trial = {**stage.fixed, "loss": "focal", "focal_gamma": 1.5, "unfreeze_every": 2}
    cfg = with_overrides(TrainConfig(), trial)
    assert (cfg.loss, cfg.focal_gamma, cfg.freeze_stages, cfg.unfreeze_every) == (
        "focal", 1.5, 2, 2)


def test_base_config_layers_fixed_carried_stage_fixed_and_epochs() -> None:
    stage = Stage("s", trials=1, epochs=7, fixed={"lr": 0.3, "epochs": 99})
    pipeline = Pipeline("digits", "val_acc", {"lr": 0.1, "momentum": 0.5, "seed": 1}, (stage,))
    got = base_config(pipeline, stage, {"momentum": 0.9, "lr": 0.2})
    assert got == {"dataset": "digits", "lr": 0.3, "momentum": 0.9, "seed": 1, "epochs": 7,
                   "best_metric": "val_acc"}
    # The epoch a trial keeps is its best by the pipeline's metric.
    by_loss = Pipeline("digits", "val_loss", {}, (stage,))
    assert base_config(by_loss, stage, {})["best_metric"] == "val_loss"


def test_parse_space_accepts_a_dict_and_names_the_source() -> None:
    with pytest.raises(SpaceError, match=r"^somewhere: stage 'a': trials"):
        parse_space({"dataset": "digits", "stage": [{"name": "a", "trials": -1, "epochs": 1}]},
                    "somewhere")


@pytest.mark.parametrize("field", ["best_metric", "test"])
def test_fields_that_follow_from_the_pipeline_cannot_be_set(field: str) -> None:
    value = "val_loss" if field == "best_metric" else True
    with pytest.raises(SpaceError, match=rf"fixed.{field}: a space file cannot set it"):
        parse_space({"dataset": "digits", "fixed": {field: value},
                     "stage": [{"name": "a", "trials": 1, "epochs": 1}]}, "f.toml")
