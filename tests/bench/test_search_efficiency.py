"""The search-efficiency benchmark's accounting and report, on runs written by hand (no
training), and the space files it writes, read by the real space loader."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import search_efficiency as se  # bench/ is not a package: imported from its folder

from search.space import grid
from search.space.params import in_range
from search.space.spec import Pipeline, Stage, base_config, load_space


def test_runs_are_cut_at_the_budget_in_the_order_trained() -> None:
    run = se.Run("tpe", 0, curve=[0.1, 0.5, 0.4, 0.9])
    assert run.best(3) == 0.5  # the 0.9 came after the budget
    assert run.to_target(4, 0.9) == 4
    assert run.to_target(3, 0.9) is None


def test_the_summary_counts_epochs_to_randoms_final_mean_best() -> None:
    # Random's final bests are 0.6 and 0.8, so the goal is their mean, 0.7; random seed 1
    # reaches it at epoch 4, seed 0 never (counted as the budget, 8): random's mean is 6.
    runs = [
        se.Run("random", 0, curve=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6]),
        se.Run("random", 1, curve=[0.2, 0.3, 0.5, 0.8, 0.8, 0.8, 0.8, 0.8]),
        se.Run("staged", 0, curve=[0.7, 0.9, 0.9, 0.9]),  # stopped early: only 4 epochs
        se.Run("staged", 1, curve=[0.5, 0.6, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.99]),
    ]
    goal, lines = se.efficiency(runs, ("staged", "random", "tpe"), budget=8)
    assert goal == pytest.approx(0.7)
    staged, random = lines  # no tpe runs: no line
    assert (staged.method, random.method) == ("staged", "random")
    assert random.to_random == 6 and random.reached == 1 and random.ratio == 1
    assert staged.to_random == 2 and staged.reached == 2  # epochs 1 and 3
    assert staged.ratio == pytest.approx(2 / 6)
    # Mean curves of the best so far: random's is 0.15, 0.25, 0.4, 0.6, 0.65, 0.7 (its last rise
    # at epoch 6); staged's (seed 0 keeps 0.9 after its 4 epochs) 0.6, 0.75: epoch 2.
    assert se.mean_best_curve(runs[:2], 8)[:6] == pytest.approx([0.15, 0.25, 0.4, 0.6, 0.65, 0.7])
    assert (random.curve_to_random, random.curve_ratio) == (6, 1)
    assert staged.curve_to_random == 2 and staged.curve_ratio == pytest.approx(2 / 6)
    # Best at 50% (4 epochs), 75% (6) and 100% (8), the 0.99 of epoch 9 outside the budget.
    assert [m for m, _ in staged.best] == pytest.approx([0.825, 0.825, 0.825])
    assert [m for m, _ in random.best] == pytest.approx([0.6, 0.7, 0.7])
    assert random.best[2][1] == pytest.approx(0.1414, abs=1e-4)
    mode = se.Mode(**{**asdict(se.MODES["digits"]["quick"]), "budget": 8})
    text = "\n".join(se.efficiency_table(mode, runs, ("staged", "random")))
    assert "random's final mean best 0.7000" in text and "0.33" in text


def test_the_paired_table_subtracts_seed_by_seed() -> None:
    runs = [se.Run("staged", 0, curve=[0.5, 0.9]), se.Run("staged", 1, curve=[0.6, 0.6]),
            se.Run("tpe", 0, curve=[0.7, 0.7]), se.Run("tpe", 1, curve=[0.6, 0.8]),
            se.Run("tpe", 2, curve=[0.9, 0.9])]  # no staged seed 2: left out of the pairs
    mode = se.Mode(**{**asdict(se.MODES["digits"]["quick"]), "budget": 2})
    lines = se.paired_table(mode, runs, ("staged", "tpe"), "staged")
    (row,) = [line for line in lines if "joint TPE" in line]
    # At 50% (1 epoch): -0.2 and 0.0, mean -0.1; at 100%: +0.2 and -0.2, mean 0.
    assert "-0.1000 ± 0.1414 (1/2)" in row and "+0.0000 ± 0.2828 (1/2)" in row, row


def test_stage_gains_are_rises_of_the_best_so_far() -> None:
    run = se.Run("cyclic", 0, curve=[0.5, 0.6, 0.55, 0.58, 0.7, 0.2],
                 stages=[{"name": "optimizer", "first": 1, "last": 2},
                         {"name": "architecture", "first": 3, "last": 4},
                         {"name": "optimizer-2", "first": 5, "last": 6}])
    gains = se.stage_gains(run, budget=5)
    assert [(n, f, last) for n, f, last, _, _ in gains] == [
        ("optimizer", 1, 2), ("architecture", 3, 4), ("optimizer-2", 5, 5)]
    assert [g for *_, g in gains] == pytest.approx([0.6, 0.0, 0.1])


def test_without_random_runs_there_is_no_goal() -> None:
    goal, lines = se.efficiency([se.Run("tpe", 0, curve=[0.5])], ("tpe",), budget=1)
    assert goal is None and lines[0].to_random is None and lines[0].ratio is None
    assert lines[0].curve_to_random is None and lines[0].curve_ratio is None


@pytest.mark.parametrize("task", se.TASKS)
@pytest.mark.parametrize("method", se.METHODS)
def test_every_space_file_loads_and_the_mode_round_trips(task: str, method: str,
                                                          tmp_path: Path) -> None:
    for kind in ("quick", "full"):
        mode = se.MODES[task][kind]
        assert se.parse_mode(json.dumps(asdict(mode))) == mode  # what a --role child reads
        space = tmp_path / f"{kind}.toml"
        # No earlier study of a related task for digits.
        if method in se.FROM_PRIOR and task not in se.PRIOR:
            with pytest.raises(SystemExit, match="no earlier study for digits"):
                se.space_text(mode, 1, method=method)
            continue
        space.write_text(se.space_text(mode, 1, method=method))
        stages = load_space(space).stages
        names = [s.name for s in stages]
        if method == "staged":
            assert names == ["optimizer", "architecture", "regularization"]
        elif method in ("cyclic", "patience"):
            assert names == ["optimizer", "architecture", "regularization", "optimizer-2",
                             "architecture-2", "regularization-2"]
            patience = [s.patience for s in stages]
            assert patience == ([3, 2, 2, 3, 2, None] if method == "patience" else [None] * 6)
        elif method == "screened":
            assert names == ["screen", "optimizer", "architecture", "regularization"]
            # The screen searches every parameter the stages do, each stage its own group.
            assert set(stages[0].params) == {k for s in stages[1:] for k in s.params}
            assert len(stages[0].params) == 10
        elif method == "coupled":
            assert names == ["training", "architecture", "training-2"]
            assert set(stages[0].params) == set(stages[2].params)
            assert len(stages[0].params) == 7 and len(stages[1].params) == 3
            # Only the last is warm-started: it repeats the first stage's parameters.
            assert [s.warm_start for s in stages] == [False, False, True]
        elif method in ("ordered", "regtwice", "ordreg", "centred", "regpat", "strat",
                        "stratopt", "prior", "priorhb"):
            again = "optimizer" if method == "ordered" else "regularization"
            assert names == ["optimizer", "regularization", "architecture", f"{again}-2"]
            assert stages[3].params == stages[names.index(again)].params
            assert [s.warm_start for s in stages] == [False, False, False, True]
            # Ordered by the headroom measured: the last stage must be a continuum, not the
            # architecture's 8 configurations, or what the others leave would go unspent.
            assert grid.size(stages[3].params) is None
            # Only regpat's architecture stage has patience; it passes its trials on.
            assert [s.patience for s in stages] == (
                [None, None, 2, None] if method == "regpat" else [None] * 4)
            # Only strat's start-up trials are stratified in every stage, stratopt's in the
            # optimizer stage alone.
            assert [s.sampler.stratified for s in stages] == (
                [True] * 4 if method == "strat"
                else [True, False, False, False] if method in ("stratopt", "prior", "priorhb")
                else [False] * 4)
            # Only prior's optimizer stage starts from a configuration: the other task's.
            assert [s.start for s in stages] == (
                [(se.PRIOR[task],), (), (), ()] if method in se.FROM_PRIOR else [()] * 4)
            # priorhb prunes every stage with Hyperband, as the `hyperband` baseline does.
            assert {s.pruner.type for s in stages} == (
                {"hyperband"} if method == "priorhb" else {"median"})
        else:
            assert names == ["joint"] and len(stages[0].params) == 10
        if method in se.SERVICE:
            budget_spent_by_design(mode, stages)


def test_centred_holds_the_later_groups_at_the_centres_of_their_ranges(tmp_path: Path) -> None:
    mode = se.MODES["digits-hard"]["full"]
    space = tmp_path / "centred.toml"
    space.write_text(se.space_text(mode, 0, method="centred"))
    pipeline = load_space(space)
    # Label smoothing [0, 0.2] and dropout [0, 0.3] at their midpoints, weight decay [1e-5, 1e-2]
    # (log) at its geometric one; the architecture's choices have no centre and keep [fixed].
    assert pipeline.fixed["label_smoothing"] == pytest.approx(0.1)
    assert pipeline.fixed["dropout"] == pytest.approx(0.15)
    assert pipeline.fixed["weight_decay"] == pytest.approx(10 ** -3.5, rel=1e-5)
    assert (pipeline.fixed["model"], pipeline.fixed["width"]) == ("resnet20", 0.5)
    # Nothing the first stage searches is fixed, and otherwise it is regtwice's file.
    assert not set(pipeline.stages[0].params) & set(pipeline.fixed)
    regtwice = load_space_text(tmp_path, se.space_text(mode, 0, method="regtwice"))
    assert pipeline.stages == regtwice.stages
    assert {k: v for k, v in pipeline.fixed.items()
            if k not in ("label_smoothing", "dropout", "weight_decay")} == regtwice.fixed


def load_space_text(folder: Path, text: str) -> Pipeline:
    path = folder / "other.toml"
    path.write_text(text)
    return load_space(path)


def budget_spent_by_design(mode: se.Mode, stages: tuple[Stage, ...]) -> None:
    """The two bounds of the stage trial budgets, read from the loaded space file."""
    # With nothing pruned, every stage's first trial ends within the budget: no stage of any pass
    # is cut off by the stages before it. Under Hyperband, whose brackets stop most trials early,
    # that holds at the epochs a trial is expected to train (bench: HYPERBAND_PER_TRIAL).
    def spent(stage: Stage) -> float:
        hyperband = stage.pruner.type == "hyperband"
        return stage.trials * (se.HYPERBAND_PER_TRIAL if hyperband else stage.epochs)

    for index, stage in enumerate(stages):
        before = sum(spent(s) for s in stages[:index])
        assert before + stage.epochs <= mode.budget, (stage.name, before)
    # With every trial pruned as early as the pruner may (from its warm-up epoch, never after the
    # last) and every finite stage closing once its configurations are trained, the trials still
    # spend the whole budget: nothing pruning saves is left idle.
    least = 0
    for stage in stages:
        first = (stage.pruner.min_epochs if stage.pruner.type == "hyperband"
                 else min(stage.pruner.warmup_epochs, stage.epochs) or 1)
        least += first * min(stage.trials, grid.size(stage.params) or stage.trials)
    assert least >= mode.budget


def test_the_last_stage_takes_what_pruning_saves() -> None:
    # 27 epochs, 3 a trial, pruning from epoch 2: shares 10.8, 8.1, 8.1 epochs make 3 and 2
    # trials; at worst those 5 end at epoch 2 (10 epochs), so the last needs ceil(17 / 2) = 9.
    mode = se.MODES["digits-hard"]["quick"]
    assert (mode.budget, mode.epochs, mode.warmup) == (27, 3, 2)
    assert se.stage_trials(mode, 1) == [3, 2, 9]
    # Two passes: each stage of a pass 1 trial (5.4 and 4.05 epochs), the last again 9.
    assert se.stage_trials(mode, 2) == [1, 1, 1, 1, 1, 9]
    # The architecture stage has 8 configurations: budgeted 9 trials, it closes after 8.
    full = se.MODES["digits-hard"]["full"]
    assert (full.budget, full.epochs, full.warmup) == (120, 4, 3)
    assert se.configurations(se.stage_params(full)[1][1]) == 8
    assert se.stage_trials(full, 1) == [12, 9, math.ceil((120 - 3 * (12 + 8)) / 3)]
    # A 0.3 screen: 36 epochs (9 trials), the stages 0.7 of SHARES (33.6, 25.2 epochs: 8 and 6
    # trials), the last what 9 + 8 + 6 trials stopped at epoch 3 leave: ceil((120 - 69) / 3).
    assert se.stage_trials(full, 1, 0.3) == [9, 8, 6, 17]
    # `coupled`: 72 and 24 epochs (18 and 6 trials), the last what those stopped at epoch 3
    # leave: ceil((120 - 72) / 3).
    assert se.stage_trials(full, 1, stages=se.coupled_params(full), shares=se.COUPLED) == [
        18, 6, 16]
    # `ordered`: 42, 36 and 24 epochs (10, 9 and 6 trials), the last what those stopped at
    # epoch 3 leave: ceil((120 - 75) / 3). `regtwice`: 48, 30 and 24 epochs (12, 7, 6 trials).
    assert se.stage_trials(full, 1, stages=se.ordered_params(full), shares=se.ORDERED) == [
        10, 9, 6, 15]
    assert se.stage_trials(full, 1, stages=se.ordered_params(full, "regularization"),
                           shares=se.REGTWICE) == [12, 7, 6, math.ceil((120 - 75) / 3)]
    # `priorhb`: REGTWICE's 48, 30 and 24 epochs at 2 a trial (24, 15 and 12 trials), the last
    # what those stopped at epoch 1 leave, the architecture's 12 counted as its 8
    # configurations: 120 - (24 + 15 + 8).
    assert se.stage_trials(full, 1, stages=se.ordered_params(full, "regularization"),
                           shares=se.REGTWICE, least=1, per_trial=2.0) == [24, 15, 12, 73]


def test_a_stored_run_is_reused_only_for_the_same_runs(tmp_path: Path) -> None:
    mode = se.MODES["digits-hard"]["full"]
    out = tmp_path / "staged-s1.json"
    run = se.Run("staged", 1, curve=[0.5, 0.6])
    stored = {"mode": asdict(mode), "space": se.space_text(mode, 1, method="staged"),
              "run": asdict(run)}
    out.write_text(json.dumps(stored))
    assert se.finished(out, mode) == run
    # A report-only field may differ; a field that changes what is trained may not.
    assert se.finished(out, dataclasses.replace(mode, target=0.5, seeds=2)) == run
    assert se.finished(out, dataclasses.replace(mode, budget=100)) is None
    # Nor may the space file (the stage trial budgets live there), e.g. one from older code.
    out.write_text(json.dumps({**stored, "space": stored["space"].replace("trials = 12",
                                                                           "trials = 13")}))
    assert se.finished(out, mode) is None
    out.write_text(json.dumps(stored)[:40])  # cut short
    assert se.finished(out, mode) is None


def test_random_searchs_expected_best_is_read_from_its_pooled_trials() -> None:
    # Two values: one draw is either, two draws miss the better only if both take the worse.
    assert se.expected_best([0.0, 1.0], 1) == pytest.approx(0.5)
    assert se.expected_best([1.0, 0.0], 2) == pytest.approx(0.75)
    assert se.expected_best([0.3, 0.3, 0.3], 5) == pytest.approx(0.3)
    # Each trial's best of its 2 epochs; the trailing half trial (cut by the budget) left out.
    run = se.Run("random", 0, curve=[0.1, 0.4, 0.2, 0.3, 0.9])
    assert se.trial_bests(run, 2) == [0.4, 0.3]
    mode = se.Mode(**{**asdict(se.MODES["digits-hard"]["quick"]), "budget": 4, "epochs": 2,
                      "startup": 1})
    lines = se.random_expectation(mode, [run, se.Run("random", 1, curve=[0.5, 0.6, 0.0, 0.2]),
                                         se.Run("tpe", 0, curve=[1.0] * 4)])
    # 4 trials pooled (0.4, 0.3, 0.6, 0.2); at 50% (1 trial) the seeds drew 0.4 and 0.6.
    assert lines[0].startswith("random search, 2 seeds, 4 trials pooled")
    assert "50%: 0.5000 drawn, 0.3750 expected" in lines[0] and "25%" not in lines[0]
    assert "first 1 trials (the joint methods' start-up) averaged 0.5000, all 4 0.3750" in lines[1]
    assert se.random_expectation(mode, [se.Run("tpe", 0, curve=[1.0] * 4)]) == []


def test_the_criterion_table_says_how_sure_each_verdict_is() -> None:
    mode = se.MODES["digits-hard"]["full"]

    def run(method: str, seed: int, best: float) -> se.Run:
        return se.Run(method, seed, curve=[best] * mode.budget)

    # Ahead of every baseline in every seed: every resampling agrees.
    runs = [run(m, s, 0.90 + 0.01 * s) for m in se.BASELINES for s in range(4)]
    runs += [run("regtwice", s, 0.91 + 0.01 * s) for s in range(4)]
    (head, line) = se.criterion_table(mode, runs, ("regtwice", *se.BASELINES), draws=500)
    assert "random, tpe, hyperband" in head
    assert line.count("+0.0100 (1.00)") == 3 and "all 1.00" in line and "(4 seeds)" in line
    # Ahead by 0.03 in one seed of four, behind by 0.01 in the others: level on average, and a
    # resampling holds exactly when it draws the winning seed at least once in its four draws.
    runs = [run(m, s, 0.90) for m in se.BASELINES for s in range(4)]
    runs += [run("regtwice", s, 0.93 if s == 0 else 0.89) for s in range(4)]
    (_, line) = se.criterion_table(mode, runs, ("regtwice", *se.BASELINES), draws=4000)
    share = float(line.split("(")[1].split(")")[0])
    # P(seed 0 drawn at least once in 4 draws) = 1 - (3/4)^4 = 0.684.
    assert share == pytest.approx(1 - 0.75 ** 4, abs=0.03)
    assert line.startswith(f"  {se.LABELS['regtwice']}") and "0.0000 (" in line
    # A method without the baselines' seeds is left out rather than compared on none.
    assert se.criterion_table(mode, runs[:12], ("regtwice", *se.BASELINES)) == [head]
    # Without a baseline there is no criterion to read.
    assert se.criterion_table(mode, runs, ("regtwice",)) == []


def test_criterion_power_grows_with_the_lead_and_the_seeds() -> None:
    mode = se.MODES["digits-hard"]["full"]
    # Every method's best is noisy over seeds (0.90 +- 0.02, independent draws per method).
    draw = random.Random(3)
    runs = [se.Run(m, s, curve=[0.90 + draw.gauss(0, 0.02)] * mode.budget)
            for m in ("regtwice", *se.BASELINES) for s in range(10)]
    level, ahead, far = (se.criterion_power(mode, runs, "regtwice", d, (10, 40))
                         for d in (0.0, 0.005, 0.05))
    assert level is not None and ahead is not None and far is not None
    # Level with the best baseline: at best a coin flip, however many seeds.
    assert level[0] < 0.6 and level[1] < 0.6
    # Ahead: more seeds decide it more often; far ahead, always.
    assert level[0] < ahead[0] < ahead[1]
    assert far == [1.0, 1.0]
    # Seeds the baselines lack do not count.
    assert se.criterion_power(mode, runs[:10], "regtwice", 0.005, (10,)) is None


@pytest.mark.parametrize("task", ["digits-hard", "synthetic-hard"])
def test_the_started_baselines_start_where_prior_starts(task: str, tmp_path: Path) -> None:
    from trainer.config import TrainConfig, with_overrides

    mode = se.MODES[task]["full"]
    prior_file, joint_file = tmp_path / "prior.toml", tmp_path / "tpestart.toml"
    prior_file.write_text(se.space_text(mode, 3, method="prior"))
    joint_file.write_text(se.space_text(mode, 3, method="tpestart"))
    prior, joint = load_space(prior_file), load_space(joint_file)
    # What the service trains first in prior's optimizer stage: its start point over the
    # stage's base (search/space/spec.py), nothing carried in yet.
    first = prior.stages[0]
    (start,) = first.start
    trained = with_overrides(TrainConfig(), {**base_config(prior, first, {}), **start})
    point = se.start_point(mode, joint, joint.stages[0])
    assert set(point) == set(joint.stages[0].params) and len(point) == 10
    assert point == {name: getattr(trained, name) for name in point}
    # Every value lies in the joint space (or Optuna would only warn and train it anyway).
    for name, value in point.items():
        assert in_range(joint.stages[0].params[name], value) == value


def test_a_started_baseline_needs_an_earlier_study(tmp_path: Path) -> None:
    mode = se.MODES["digits"]["full"]
    space = tmp_path / "tpestart.toml"
    space.write_text(se.space_text(mode, 0, method="tpestart"))
    pipeline = load_space(space)
    with pytest.raises(SystemExit, match="no earlier study for digits"):
        se.start_point(mode, pipeline, pipeline.stages[0])


def test_a_started_baseline_trains_the_start_first(tmp_path: Path) -> None:
    from trainer.config import TrainConfig, with_overrides
    from trainer.train import train

    # A budget of one trial of two epochs: the start configuration's, or another's.
    mode = dataclasses.replace(se.MODES["digits-hard"]["full"], budget=2, epochs=2, warmup=2)
    space = tmp_path / "tpestart.toml"
    space.write_text(se.space_text(mode, 0, method="tpestart"))
    run = se.run_joint("tpestart", 0, mode, space)
    pipeline = load_space(space)
    stage = pipeline.stages[0]
    cfg = with_overrides(TrainConfig(), {**base_config(pipeline, stage, {}),
                                         **se.start_point(mode, pipeline, stage),
                                         "device": "cpu"})
    alone: list[float] = []
    train(cfg, lambda epoch, metrics: alone.append(metrics["val_acc"]))
    assert run.trials == 1 and len(alone) == 2
    # Training is deterministic for a configuration and seed: both epochs' figures, to the bit
    # (one epoch's accuracy alone can coincide between configurations, on 1,152 images).
    assert run.curve == alone
