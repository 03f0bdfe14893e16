"""A custom Task is the one extension point: it reaches every score, ground truth and stored key.

The custom task here measures the margin of one fixed class (how strongly the model says "class
3", whatever the query's label), a measurement the default task never takes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_methods import loop_gradients

from attribution_core import api
from attribution_core.data import DataSpec
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.evaluation.mislabel import rank_mislabels
from attribution_core.methods.baselines import GradientDot
from attribution_core.models import ModelSpec
from attribution_core.runs.run import Recipe, Stage
from attribution_core.runs.training import retrain, train
from attribution_core.store import Workspace
from attribution_core.task import Task, correct_class_margin

QUERIES = [0, 1, 2, 3]


class FixedClassMargin(Task):
    """Measures the margin of one fixed class for every example."""

    def __init__(self, target: int):
        self.target = target

    def measurement(self, model, x, y):
        return correct_class_margin(model(x), torch.full_like(y, self.target))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = DataSpec(source="digits", test_size=40, max_train=120)
    return train(data, ModelSpec("mlp", {"hidden": [8]}), Recipe((Stage(epochs=2, batch_size=32),)),
                 Workspace(tmp_path_factory.mktemp("ws")), "digits-task")


def test_task_keys_name_the_class_and_its_attributes():
    assert FixedClassMargin(3).key() == FixedClassMargin(3).key()
    assert len({Task().key(), FixedClassMargin(3).key(), FixedClassMargin(4).key()}) == 3


def test_scores_use_the_tasks_measurement(run):
    """Gradient dot under the custom task equals −∇f_task(q)ᵀ∇L(m), computed one example at a time."""
    train_set, test_set = run.datasets()
    model = run.load_model(-1)
    task = FixedClassMargin(3)
    expected = -loop_gradients(model, test_set.x[QUERIES], test_set.y[QUERIES], "measurement", task).double() @ \
        loop_gradients(model, train_set.x, train_set.y, "loss").double().T
    scores = api.attribute(run, "graddot", queries=QUERIES, task=task, device="cpu")
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-4, atol=1e-6)
    default = api.attribute(run, "graddot", queries=QUERIES, device="cpu")
    assert not np.allclose(default.values, scores.values)


def test_nothing_stored_for_one_task_is_reused_for_another(run, monkeypatch):
    fits = []
    real_fit = GradientDot.fit
    monkeypatch.setattr(GradientDot, "fit", lambda self, inputs: fits.append(inputs.task) or real_fit(self, inputs))
    first = api.attribute(run, "graddot", queries=QUERIES, task=FixedClassMargin(5), device="cpu")
    again = api.attribute(run, "graddot", queries=QUERIES, task=FixedClassMargin(5), device="cpu")
    other = api.attribute(run, "graddot", queries=QUERIES, task=FixedClassMargin(6), device="cpu")
    assert [task.target for task in fits] == [5, 6]  # the same task reuses its state, another task fits its own
    assert first.key == again.key != other.key
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.allclose(first.values, other.values)


def test_lds_ground_truth_retrains_and_measures_with_the_task(run):
    settings = LdsSettings(n_subsets=3, alpha=0.5)
    task = FixedClassMargin(3)
    truth = groundtruth(run, settings, task=task)
    _, test_set = run.datasets()
    model = retrain(run, truth.masks[1], seed=run.recipe.seed)
    with torch.no_grad():
        expected = task.measurement(model.eval(), test_set.x, test_set.y).numpy()
    np.testing.assert_allclose(truth.margins[1], expected, rtol=1e-5, atol=1e-5)
    default_truth = groundtruth(run, settings)
    assert default_truth.key != truth.key and not np.allclose(default_truth.margins, truth.margins)
    result = lds(api.attribute(run, "graddot", queries=QUERIES, task=task, device="cpu"), truth)
    assert result.per_query.shape == (len(QUERIES),)


def test_mislabel_rankings_are_kept_per_task(run):
    class HalvedLoss(Task):
        """Half the cross-entropy: the same ranking, a different stored loss."""

        def train_loss(self, model, x, y):
            return 0.5 * super().train_loss(model, x, y)

    plain, halved = rank_mislabels(run, "loss"), rank_mislabels(run, "loss", task=HalvedLoss())
    np.testing.assert_allclose(halved.scores, 0.5 * plain.scores, rtol=1e-6)
