"""The counterfactual check removes exactly the chosen examples, is seeded, stored and resumable."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from attribution_core.api import attribute
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError
from attribution_core.evaluation import counterfactual as counterfactual_module
from attribution_core.evaluation.counterfactual import (
    CounterfactualResult,
    CounterfactualSettings,
    counterfactual,
    query_outcome,
    removals,
)
from attribution_core.models import ModelSpec
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.session import TrainingSession
from attribution_core.runs.training import retrain, stage_indices, train
from attribution_core.store import Workspace
from attribution_core.task import Task

pytestmark = pytest.mark.usefixtures("single_threaded")
DIGITS = DataSpec(source="digits", test_size=360, split_seed=0, max_train=240, max_test=20)
TWO_STAGES = Recipe(
    (Stage(name="pretrain", epochs=2, lr=0.05, batch_size=32),
     Stage(name="finetune", epochs=2, lr=0.02, batch_size=32, classes=(0, 1, 2, 3, 4))),
    seed=1,
    checkpoints=CheckpointPolicy(every_epochs=1),
)
QUERY = 3


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    return train(DIGITS, ModelSpec("mlp", {"hidden": [16]}), TWO_STAGES, Workspace(tmp_path_factory.mktemp("cf")), "two-stage")


@pytest.fixture
def recorded_fits(monkeypatch):
    """Every retrain the check makes, as {stage: set of train indices its batches drew}.

    Retrains run one after another, each through one session: the stage count restarts with each retrain (keyed by the
    retrain, not by the session's id(), which a later session may reuse once an earlier one is freed).
    """
    calls: list[dict[int, set[int]]] = []
    stages: list[int] = []  # per retrain, the index of the stage its session is in
    original_retrain, original_stage, original_step = counterfactual_module.retrain, TrainingSession.stage, TrainingSession.step

    def retrain(*args, **kwargs):
        calls.append({})
        stages.append(-1)
        return original_retrain(*args, **kwargs)

    def stage(self, name):
        stages[-1] += 1
        return original_stage(self, name)

    def step(self, optimizer, batch, losses=None, margins=None):
        calls[-1].setdefault(stages[-1], set()).update(batch.rows.tolist())
        return original_step(self, optimizer, batch, losses, margins)

    monkeypatch.setattr(counterfactual_module, "retrain", retrain)
    monkeypatch.setattr(TrainingSession, "stage", stage)
    monkeypatch.setattr(TrainingSession, "step", step)
    return calls


def test_each_retrain_drops_exactly_the_removed_examples_from_every_stage(two_stage_run, recorded_fits):
    settings = CounterfactualSettings(k=0.1, n_random=1, seeds=(0,))
    result = counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
    train_set, _ = two_stage_run.datasets()
    assert list(result.removed) == ["proponents", "opponents", "random_0"]
    assert len(recorded_fits) == 3  # the full-data model with seed offset 0 is the stored run, not retrained
    for seen, (kind, removed) in zip(recorded_fits, result.removed.items()):
        assert len(removed) == len(set(removed)) == round(0.1 * 240)
        for stage_index, stage in enumerate(TWO_STAGES.stages):
            expected = set(stage_indices(stage, train_set.y, None).tolist()) - set(removed)
            assert seen[stage_index] == expected, f"{kind}: stage {stage.name} trained on the wrong examples"


def test_removed_examples_are_the_methods_top_and_bottom_scores(two_stage_run):
    settings = CounterfactualSettings(k=7, n_random=0)
    result = counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
    values = attribute(two_stage_run, "graddot", queries=[QUERY]).values[0]
    assert result.k == 7
    assert sorted(values[result.removed["proponents"]]) == sorted(np.sort(values)[-7:])
    assert sorted(values[result.removed["opponents"]]) == sorted(np.sort(values)[:7])
    assert min(values[result.removed["proponents"]]) > max(values[result.removed["opponents"]])


def test_random_removals_are_seeded_and_reproducible():
    values = np.arange(50, dtype=np.float32)
    settings = CounterfactualSettings(k=5, n_random=3, random_seed=4)
    first, again = removals(values, 5, settings), removals(values, 5, settings)
    assert first == again
    generator = np.random.default_rng(4)
    for draw in range(3):
        assert first[f"random_{draw}"] == sorted(generator.choice(50, size=5, replace=False).tolist())
    other = removals(values, 5, CounterfactualSettings(k=5, n_random=3, random_seed=5))
    assert other["random_0"] != first["random_0"]
    assert first["proponents"] == [49, 48, 47, 46, 45] and first["opponents"] == [0, 1, 2, 3, 4]


def test_base_margin_is_the_stored_model_which_equals_retraining_on_everything(two_stage_run):
    settings = CounterfactualSettings(k=5, n_random=0, seeds=(0, 1))
    result = counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
    train_set, test_set = two_stage_run.datasets()
    x, label = test_set.x[QUERY : QUERY + 1], int(test_set.y[QUERY])
    everything = np.ones(len(train_set), dtype=bool)
    for offset, margin, prediction in zip((0, 1), result.base_margins, result.base_predictions):
        model = retrain(two_stage_run, everything, seed=TWO_STAGES.seed + offset)
        assert (margin, prediction) == query_outcome(model, Task(), x, label)
    assert result.base_margins[0] == query_outcome(two_stage_run.load_model(-1), Task(), x, label)[0]
    assert result.true_label == label and result.seeds == [0, 1]


def test_result_is_stored_and_a_killed_check_resumes_from_finished_retrains(two_stage_run, monkeypatch):
    settings = CounterfactualSettings(k=4, n_random=2, seeds=(0,), random_seed=9)

    def kill_after_two(done, total):
        if done == 2:  # two retrains are finished (the base is the stored final model, no retrain)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        counterfactual(two_stage_run, QUERY, "graddot", settings=settings, progress=kill_after_two)
    retrains = []
    original = counterfactual_module.retrain
    monkeypatch.setattr(counterfactual_module, "retrain", lambda *a, **kw: retrains.append(1) or original(*a, **kw))
    resumed = counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
    assert len(retrains) == 2  # of the four removals, two were already stored
    again = counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
    assert len(retrains) == 2 and again == resumed


def test_margin_change_is_the_mean_over_seeds_of_margin_minus_base():
    result = CounterfactualResult(
        query=0, method="trak", k=2, true_label=1, base_margins=[1.0, 3.0], removed={"proponents": [4, 5]},
        margins={"proponents": [0.5, 1.0]}, predictions={"proponents": [1, 2]}, base_predictions=[1, 1], seeds=[0, 1],
    )
    assert result.margin_change("proponents") == pytest.approx(((0.5 - 1.0) + (1.0 - 3.0)) / 2)
    assert result.flipped("proponents") == [False, True]


@pytest.mark.badinput
def test_bad_counterfactual_settings_name_the_field(two_stage_run):
    with pytest.raises(SettingsError, match="k=0"):
        CounterfactualSettings(k=0)
    with pytest.raises(SettingsError, match="k=2.5"):
        CounterfactualSettings(k=2.5)
    with pytest.raises(SettingsError, match="seeds"):
        CounterfactualSettings(seeds=())
    with pytest.raises(SettingsError, match="removes 240 of 240"):
        counterfactual(two_stage_run, QUERY, "graddot", settings=CounterfactualSettings(k=240))
    with pytest.raises(SettingsError, match="not a test index"):
        counterfactual(two_stage_run, 10_000, "graddot")


def test_query_outcome_is_the_correct_class_margin_and_argmax():
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 2))
    margin, prediction = query_outcome(model, Task(), torch.tensor([[2.0, 1.0]]), 1)
    assert prediction == 0
    assert margin == pytest.approx(1.0 - float(torch.logsumexp(torch.tensor([2.0, 0.0]), 0)))


SHARD_SCRIPT = """
import sys
from attribution_core.evaluation.counterfactual import CounterfactualSettings, counterfactual
from attribution_core.runs.run import load_run
counterfactual(load_run(sys.argv[1], "two-stage"), 3, "graddot", settings=CounterfactualSettings(k=4, n_random=2, seeds=(0, 1)))
"""


@pytest.mark.slow  # two rank processes, each importing torch
def test_torchrun_ranks_share_the_retrains_and_agree_with_one_process(two_stage_run, tmp_path):
    sharded_root = tmp_path / "sharded"
    shutil.copytree(two_stage_run.workspace.root, sharded_root)
    ranks = [
        subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, str(sharded_root)], env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"})
        for rank in (0, 1)
    ]
    assert [rank.wait(timeout=180) for rank in ranks] == [0, 0]
    settings = CounterfactualSettings(k=4, n_random=2, seeds=(0, 1))
    sharded = counterfactual(load_run(sharded_root, "two-stage"), QUERY, "graddot", settings=settings)
    assert sharded == counterfactual(two_stage_run, QUERY, "graddot", settings=settings)
