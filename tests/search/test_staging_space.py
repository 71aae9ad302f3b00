"""The staging keys of a space file (cycles, joint, screen, ties, warm_start, patience): what each
expands to, every bad value refused with one line naming file, key and value, the stored JSON in
the file's own shape, and the digests of files that use none of them unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search import manage
from search.db import budget, pipeline
from search.db.storage import open_storage
from search.space.spec import FloatParam, Pipeline, Pruner, SpaceError, load_space
from tests.search.test_space import ARCH, DISTIL, SPACES, space, write

# The digests of the shipped files as stored before these keys existed (main at 143ca16): a study
# created from one of them must still say "exists, unchanged".
DIGESTS = {
    "digits-quick.toml": "8ecafa6b0691f54487aa32a25074f60bbad646788fda8fc0f60d4c11306f0f43",
    "finetune-imagefolder.toml":
        "6ebeb5a199e0886021540a32360fd723a045ab4e2dec6eed2261062b29bb7879",
}
JOINT = 'joint = { trials = 5, epochs = 2 }'
SCREEN = 'screen = { trials = 6, epochs = 2 }'
KD = ARCH.replace("width = {", "kd_alpha = { low = 0.1, high = 0.9 }\nwidth = {")

BAD = [
    ("cycles zero", space(top="cycles = 0"), ["cycles", "at least 1, got 0"]),
    ("cycles too many", space(top="cycles = 6"), ["cycles", "at most 5, got 6"]),
    ("cycles string", space(top='cycles = "2"'), ["cycles", "expected an integer", "'2'"]),
    ("cycles bool", space(top="cycles = true"), ["cycles", "expected an integer", "True"]),
    ("ties unknown", space(top='ties = "first"'),
     ["ties", "'first' is not one of earlier, later, val_loss"]),
    ("ties not a string", space(top="ties = 1"), ["ties", "1 is not one of"]),
    ("warm_start not bool", space(stage='warm_start = "yes"'),
     ["stage 'optimizer'", "warm_start", "expected true or false", "'yes'"]),
    ("patience zero", space(stage="patience = 0"),
     ["stage 'optimizer'", "patience", "at least 1, got 0"]),
    ("patience float", space(stage="patience = 1.5"),
     ["stage 'optimizer'", "patience", "expected an integer", "1.5"]),
    ("patience misspelt", space(stage="patiense = 2"),
     ["stage 'optimizer'", "patiense", "did you mean patience"]),
    ("joint not a table", space(top="joint = 3"), ["joint", "expected a table", "3"]),
    ("joint with a name", space(top='joint = { name = "j", trials = 2, epochs = 2 }'),
     ["joint", "name", "unknown key"]),
    ("joint with params", space(top="joint = { trials = 2, epochs = 2, params = {} }"),
     ["joint", "params", "unknown key"]),
    ("joint with a teacher", space(top='joint = { trials = 2, epochs = 2, teacher = "best:x" }'),
     ["joint", "teacher", "unknown key"]),
    ("joint without trials", space(top="joint = { epochs = 2 }"), ["stage 'joint'", "trials",
                                                                   "missing"]),
    ("joint trials zero", space(top="joint = { trials = 0, epochs = 2 }"),
     ["stage 'joint'", "trials", "at least 1"]),
    ("joint bad pruner", space(top='joint = { trials = 2, epochs = 2, pruner = { type = "x" } }'),
     ["stage 'joint'", "pruner.type", "'x' is not one of"]),
    ("joint bad patience", space(top="joint = { trials = 2, epochs = 2, patience = -1 }"),
     ["stage 'joint'", "patience", "at least 1"]),
    ("joint fixes a searched field", space(top="joint = { trials = 2, epochs = 2, fixed = "
                                               "{ lr = 0.1 } }"),
     ["stage 'joint'", "params.lr", "also in this stage's fixed"]),
    ("joint after distillation", space(top=JOINT, later=DISTIL),
     ["joint", "kd_alpha", "no teacher"]),
    ("a stage named joint", space(top=JOINT, name="joint"),
     ["joint", "as is stage #1", "rename"]),
    ("screen not a table", space(top='screen = "yes"'), ["screen", "expected a table", "'yes'"]),
    ("screen with params", space(top="screen = { trials = 2, epochs = 2, params = {} }"),
     ["screen", "params", "unknown key"]),
    ("screen warm-started", space(top="screen = { trials = 2, epochs = 2, warm_start = true }"),
     ["screen", "warm_start", "unknown key"]),
    ("screen without epochs", space(top="screen = { trials = 2 }"),
     ["stage 'screen'", "epochs", "missing"]),
    ("screen bad sampler", space(top="screen = { trials = 2, epochs = 2, sampler = "
                                     "{ startup_trials = -1 } }"),
     ["stage 'screen'", "sampler", "startup_trials"]),
    ("screen over distillation only", space(top=SCREEN, params="kd_temperature = { low = 1.0, "
                                            "high = 4.0 }").replace("lr = {", "# lr = {"),
     ["screen", "search nothing the screen stage could search"]),
    ("a stage named screen", space(top=SCREEN, name="screen"),
     ["screen", "as is stage #1", "rename"]),
    ("a later pass's name taken", space(top="cycles = 2",
                                        later=ARCH.replace("architecture", "optimizer-2")),
     ["cycles", "pass 2 of stage 'optimizer'", "'optimizer-2'", "rename"]),
    ("a later pass's name too long", space(top="cycles = 2", name="o" * 63),
     ["cycles", "pass 2", "over 64 characters"]),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_staging_key_is_refused_in_one_line(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sorted(tmp_path.iterdir()) == before


def test_the_cifar_file_orders_the_groups_by_headroom() -> None:
    # Since 2026-12-04 (BENCHMARKS.md, "Ordering the stages by headroom"): the optimizer, then
    # regularization, then the architecture, then regularization again with distillation,
    # warm-started; one pass, no cycles.
    pipeline = load_space(SPACES / "cifar10-resnet.toml")
    assert pipeline.cycles == 1 and not pipeline.joint
    assert [(s.name, s.warm_start) for s in pipeline.stages] == [
        ("optimizer", False), ("regularization", False), ("architecture", False),
        ("regularization-2", True)]
    first, last = pipeline.stage("regularization"), pipeline.stage("regularization-2")
    assert set(first.params) < set(last.params)
    # Only the optimizer stage's start-up trials are stratified (BENCHMARKS.md, "A stratified
    # start-up in the optimizer stage only").
    assert [s.sampler.stratified for s in pipeline.stages] == [True, False, False, False]
    # Equal epochs a trial: the warm start reads the first stage's values as this stage's.
    assert first.epochs == last.epochs
    # About the epochs of the two passes it replaced (4,200).
    assert sum(s.trials * s.epochs for s in pipeline.stages) == 4000


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_files_without_the_keys_keep_their_stored_digest(name: str) -> None:
    pipeline = load_space(SPACES / name)
    assert pipeline.digest() == DIGESTS[name]
    stored = json.loads(pipeline.to_json())
    assert not {"cycles", "joint", "screen", "ties"} & stored.keys()
    assert not any({"warm_start", "patience"} & s.keys() for s in stored["stage"])
    assert (pipeline.cycles, pipeline.joint, pipeline.screen, pipeline.ties) == (
        1, False, False, "earlier")


def test_cycles_repeat_the_stages_warm_started_with_a_teacher_of_the_same_pass(
    tmp_path: Path
) -> None:
    text = space(top="cycles = 3", stage="patience = 2\npruner = { type = \"none\" }",
                 later=DISTIL)
    pipeline = load_space(write(tmp_path, text))
    assert [s.name for s in pipeline.stages] == [
        "optimizer", "architecture", "optimizer-2", "architecture-2", "optimizer-3",
        "architecture-3"]
    first, arch = pipeline.stages[:2]
    assert not first.warm_start and not arch.warm_start
    for k, (opt, distil) in enumerate(zip(pipeline.stages[2::2], pipeline.stages[3::2],
                                          strict=True), start=2):
        assert opt.warm_start and distil.warm_start
        assert (opt.params, opt.trials, opt.epochs, opt.pruner, opt.sampler, opt.patience) == \
               (first.params, first.trials, first.epochs, Pruner(type="none"), first.sampler, 2)
        assert distil.teacher == f"optimizer-{k}" and distil.params == arch.params


def test_the_joint_stage_searches_every_parameter_last_definition_winning(
    tmp_path: Path
) -> None:
    later = ARCH + "lr = { low = 0.02, high = 0.2 }\n"
    text = space(top="cycles = 2\njoint = { trials = 6, epochs = 4, patience = 3, "
                     "sampler = { startup_trials = 1 }, fixed = { momentum = 0.8 } }",
                 later=later)
    pipeline = load_space(write(tmp_path, text))
    assert [s.name for s in pipeline.stages][-1] == "joint" and pipeline.joint
    joint = pipeline.stages[-1]
    assert joint.params == {"lr": FloatParam(0.02, 0.2), **pipeline.stage("architecture").params}
    assert (joint.trials, joint.epochs, joint.patience, joint.sampler.startup_trials,
            joint.fixed, joint.warm_start, joint.teacher) == (6, 4, 3, 1, {"momentum": 0.8},
                                                                True, None)
    cold = load_space(write(tmp_path, space(top="joint = { trials = 2, epochs = 2,"
                                                " warm_start = false }")))
    assert not cold.stages[-1].warm_start


def test_the_screen_runs_first_over_every_parameter_and_is_not_repeated(tmp_path: Path) -> None:
    later = ARCH + "lr = { low = 0.02, high = 0.2 }\n"
    text = space(top=f"cycles = 2\n{JOINT}\nscreen = {{ trials = 6, epochs = 4, patience = 3,"
                     " sampler = { startup_trials = 2 }, fixed = { momentum = 0.8 } }",
                 later=later)
    pipeline = load_space(write(tmp_path, text))
    assert pipeline.screen and pipeline.joint
    assert [s.name for s in pipeline.stages] == [
        "screen", "optimizer", "architecture", "optimizer-2", "architecture-2", "joint"]
    screen = pipeline.stages[0]
    assert screen.params == {"lr": FloatParam(0.02, 0.2),
                             **pipeline.stage("architecture").params}
    assert (screen.trials, screen.epochs, screen.patience, screen.sampler.startup_trials,
            screen.fixed, screen.warm_start) == (6, 4, 3, 2, {"momentum": 0.8}, False)
    # The stages after it are those of a file without it.
    plain = load_space(write(tmp_path, space(top=f"cycles = 2\n{JOINT}", later=later)))
    assert pipeline.stages[1:] == plain.stages and not plain.screen
    # Beside distillation it leaves the distillation params at their base: it has no teacher.
    distil = load_space(write(tmp_path, space(top=SCREEN, later=DISTIL.replace(
        "width = {", "kd_temperature = { low = 1.0, high = 8.0 }\nwidth = {"))))
    assert set(distil.stages[0].params) == {"lr", "width"}


@pytest.mark.parametrize("top", [
    "cycles = 2", 'ties = "later"', 'ties = "val_loss"', JOINT, SCREEN,
    f"cycles = 2\n{JOINT}\n" + SCREEN.replace("}", ", patience = 2 }"),
    "cycles = 3\n" + JOINT.replace("}", ", warm_start = false, patience = 2 }"),
])
def test_stored_in_the_files_own_shape_and_read_back_equal(tmp_path: Path, top: str) -> None:
    pipeline = load_space(write(tmp_path, space(top=top, stage="warm_start = true\npatience = 4",
                                                later=ARCH)))
    stored = json.loads(pipeline.to_json())
    assert [s["name"] for s in stored["stage"]] == ["optimizer", "architecture"]
    assert stored["stage"][0]["warm_start"] is True and stored["stage"][0]["patience"] == 4
    assert "warm_start" not in stored["stage"][1] and "patience" not in stored["stage"][1]
    again = Pipeline.from_json(pipeline.to_json())
    assert again == pipeline and again.to_json() == pipeline.to_json()
    assert again.digest() == pipeline.digest()


def test_each_key_changes_the_digest(tmp_path: Path) -> None:
    plain = load_space(write(tmp_path, space())).digest()
    for top, stage in [("cycles = 2", ""), ('ties = "later"', ""), (JOINT, ""), (SCREEN, ""),
                       ("", "warm_start = true"), ("", "patience = 3")]:
        assert load_space(write(tmp_path, space(top=top, stage=stage))).digest() != plain, top
    # Written at their defaults, the keys leave the digest alone.
    same = space(top='cycles = 1\nties = "earlier"', stage="warm_start = false")
    assert load_space(write(tmp_path, same)).digest() == plain


# "optimizer" is a first pass; "architecture" would do too but for its finite space of 2, which
# `extend` refuses to raise past.
@pytest.mark.parametrize(("stage", "stored"), [("optimizer-2", False), ("joint", True),
                                               ("optimizer", False)])
def test_extend_a_later_pass_or_the_joint_stage(tmp_path: Path, stage: str, stored: bool) -> None:
    """A stored pipeline keeps the file's shape, so a later pass's budget (or a first pass's,
    which its later passes would follow) lives in its study's attribute only; the joint stage's
    is in the stored pipeline too. `hpo create` with the file leaves either as extended."""
    pipe = load_space(write(tmp_path, space(top="cycles = 2\n" + JOINT, later=ARCH)))
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", create_schema=True)
    pipeline.create(storage, "x", pipe, "space.toml")
    manage.extend(storage, "x", stage, 9)
    again = pipeline.load(storage, "x")
    assert (again.stage(stage).trials == 9) is stored
    assert [s.trials for s in again.stages if s.name != stage] == \
           [s.trials for s in pipe.stages if s.name != stage]
    assert not pipeline.create(storage, "x", pipe, "space.toml")  # exists, unchanged
    study = pipeline.load_stage_study(storage, "x", pipe.stage(stage))
    assert study.user_attrs[budget.BUDGET] == 9
