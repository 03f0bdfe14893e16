"""Attribution on what the model actually trained on: each checkpoint's stage view and each example's draws.

A two-stage run whose second stage trains only classes 0-4 on rotated images: gradients at a
stage-2 checkpoint are taken on the rotated images, and an example stage 2 never drew contributes
nothing to SOURCE's stage-2 segments or to TracIn's stage-2 checkpoints.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_methods import exact_source_scores, loop_gradients, make_inputs, mlp_trajectory, shared_input_case

from attribution_core import api
from attribution_core.data import DataSpec
from attribution_core.methods.source import Source, SourceSettings
from attribution_core.methods.tracin import TracIn
from attribution_core.models import ModelSpec
from attribution_core.numerics.inputs import Segment
from attribution_core.numerics.segments import step_weights
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage
from attribution_core.runs.training import train
from attribution_core.store import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import b2_source_regime  # noqa: E402  (its by-hand run: the rotation moved inside the model)

TWO_STAGES = Recipe(
    (Stage(name="pretrain", epochs=2, lr=0.1, batch_size=40),
     Stage(name="rotated", epochs=2, lr=0.05, batch_size=24, classes=(0, 1, 2, 3, 4), transform="rotate")),
    seed=2, checkpoints=CheckpointPolicy(every_epochs=1),
)
QUERIES = [0, 3, 8]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = DataSpec(source="digits", test_size=60, split_seed=0, max_train=160)
    return train(data, ModelSpec("mlp", {"hidden": [12]}), TWO_STAGES, Workspace(tmp_path_factory.mktemp("ws")), "views")


def test_source_with_views_and_draw_weights_equals_the_exact_per_segment_formula():
    """Where EK-FAC is exact (each view shares one input; the empirical Fisher), SOURCE is the explicit formula with each
    segment's view and weights."""
    models, train_x, train_y, query_x, query_y = shared_input_case(n_checkpoints=4)
    other_input = torch.linspace(-1, 1, train_x.shape[1], dtype=torch.float64).expand_as(train_x).clone()
    segments = [Segment(models[:2], 0.5), Segment(models[2:], 3.0, torch.tensor([2.0, 0.0, 1.0, 1.5, 0.0, 1.5]))]
    inputs = make_inputs(models, train_x, train_y, segments=segments, batch_size=4)
    inputs.views = [train_x, train_x, other_input, other_input]
    method = Source(SourceSettings(n_segments=2, fisher="empirical"))
    contributions = method.score_segments(method.fit(inputs), inputs, query_x, query_y)
    expected = exact_source_scores(inputs, query_x, query_y, curvature="empirical")
    assert torch.allclose(contributions.double(), expected, rtol=1e-5, atol=1e-7 * expected.abs().max().item())
    assert torch.all(contributions[1][:, [1, 4]] == 0)  # the examples segment 2 never drew


def test_tracin_weighs_each_checkpoint_by_its_draw_weights_on_its_view():
    models, train_x, train_y, query_x, query_y = mlp_trajectory(n_checkpoints=3, n_train=20)
    generator = torch.Generator().manual_seed(1)
    views = [train_x, train_x + 0.3 * torch.randn(train_x.shape, generator=generator), train_x.flip(1)]
    weights = [torch.ones(20), torch.rand(20, generator=generator) * 2, (torch.arange(20) % 3 == 0).float() * 3]
    inputs = make_inputs(models, train_x, train_y, batch_size=7)
    inputs.checkpoint_lrs, inputs.views, inputs.weights = [0.1, 0.2, 0.3], views, weights
    expected = sum(
        -lr * w[None, :].double()
        * (loop_gradients(model, query_x, query_y, "measurement").double() @ loop_gradients(model, view, train_y).double().T)
        for model, lr, view, w in zip(models, inputs.checkpoint_lrs, views, weights)
    )
    method = TracIn()
    state = method.fit(inputs)
    torch.testing.assert_close(method.score(state, inputs, query_x, query_y).double(), expected, rtol=1e-4, atol=1e-6)
    expected_self = sum(lr * w * loop_gradients(model, view, train_y).square().sum(1)
                        for model, lr, view, w in zip(models, inputs.checkpoint_lrs, views, weights))
    torch.testing.assert_close(method.self_influence(state, inputs), expected_self, rtol=1e-4, atol=1e-6)


def _counted_weights(run, first_step: int, last_step: int) -> np.ndarray:
    """Draw weights counted batch by batch from the record, each step by its lr / (1 − momentum), mean 1."""
    record, n = run.record, len(run.datasets()[0])
    per_step = step_weights(np.asarray(run.trajectory.lr), np.asarray(run.trajectory.momentum), run.trajectory.optimizer)
    counts = np.zeros(n)
    for step in range(first_step, last_step + 1):
        batch = record.batch(step)
        np.add.at(counts, batch, per_step[step - 1] / len(batch))
    return n * counts / per_step[first_step - 1 : last_step].sum()


def test_the_front_door_gives_each_checkpoint_its_stages_view_and_draw_weights(run):
    train_set, _ = run.datasets()
    inputs = api.prepare(run, "tracin", device="cpu").inputs
    stage_two = TWO_STAGES.stages[1].members(train_set.y.numpy())
    for index, (view, weights) in enumerate(zip(inputs.views, inputs.weights)):
        info = run.checkpoints[index]
        rotated = info.stage == 1
        assert torch.equal(view, torch.rot90(train_set.x, 1, dims=(-2, -1)) if rotated else train_set.x)
        previous = run.checkpoints[index - 1].step if index else 0
        np.testing.assert_allclose(weights.numpy(), _counted_weights(run, previous + 1, info.step), rtol=1e-5)
        if rotated:
            assert np.all(weights.numpy()[~stage_two] == 0)


def test_tracin_through_the_front_door_is_the_direct_sum_over_checkpoints_with_views_and_draws(run):
    train_set, test_set = run.datasets()
    expected = 0
    for index, info in enumerate(run.checkpoints):
        model = run.load_model(index)
        view = run.train_view(info.stage)
        previous = run.checkpoints[index - 1].step if index else 0
        lr = run.trajectory.lr[info.step - 1]
        weights = torch.as_tensor(_counted_weights(run, previous + 1, info.step))
        dots = loop_gradients(model, test_set.x[QUERIES], test_set.y[QUERIES], "measurement").double() @ \
            loop_gradients(model, view, train_set.y).double().T
        expected = expected - lr * weights[None, :] * dots
    scores = api.attribute(run, "tracin", queries=QUERIES, device="cpu")
    np.testing.assert_allclose(scores.values, expected.numpy(), rtol=1e-4, atol=1e-6)


def test_source_segments_weigh_examples_by_their_draws_and_a_stage_2_segment_ignores_the_unseen(run):
    train_set, test_set = run.datasets()
    prepared = api.prepare(run, "source", settings={"n_segments": 2}, device="cpu")
    first, second = prepared.inputs.segments
    np.testing.assert_allclose(first.weights.numpy(), _counted_weights(run, 1, run.checkpoints[1].step), rtol=1e-5)
    np.testing.assert_allclose(second.weights.numpy(), _counted_weights(run, run.checkpoints[1].step + 1, run.trajectory.n_steps),
                               rtol=1e-5)
    unseen = ~TWO_STAGES.stages[1].members(train_set.y.numpy())
    scores = api.attribute(run, "source", queries=QUERIES, settings={"n_segments": 2}, device="cpu")
    assert np.all(scores.segment_values[1][:, unseen] == 0) and np.any(scores.segment_values[0][:, unseen] != 0)


def test_a_rotate_stage_attributed_natively_scores_what_the_rotation_moved_inside_the_model_by_hand_scores(run):
    # B2's by-hand run: a plain loop replays this run's record with a model that rotates its own inputs in stage 2 (it
    # refuses unless its final weights equal the run's); SOURCE takes the query's gradient at the final model, so the
    # native path with the queries rotated as stage 2 sees them must give the same scores
    by_hand = b2_source_regime.by_hand_run(run.workspace, run)
    checkpoints = list(range(len(run.checkpoints)))
    native = api.attribute(run, "source", queries=QUERIES, settings={"n_segments": 2}, checkpoints=checkpoints,
                           task=b2_source_regime.StageTwoQueries())
    inside = api.attribute(by_hand, "source", queries=QUERIES, settings={"n_segments": 2}, checkpoints=checkpoints)
    assert np.abs(native.values).max() > 1e-3
    np.testing.assert_allclose(inside.values, native.values, rtol=1e-4, atol=1e-6 * np.abs(native.values).max())
