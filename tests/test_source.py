"""SOURCE: exact where EK-FAC is exact, its two limits (influence and TracIn), and its invariants.

The one-segment correspondence tested: with one segment and x = η̄K,
    τ_SOURCE = −(1/N) ∇fᵀ r(H) ∇L,   r(σ) = (1 − e^{−xσ})/σ,
while influence with damping 1/x, in the same unit, is −(1/N) ∇fᵀ (H + I/x)⁻¹ ∇L. Per eigencomponent the two differ by the
factor (1 − e^{−u})(1 + 1/u), u = xσ, which lies in [1, 1.30] and tends to 1 as u → 0 or ∞. In the
shared-input case every training gradient lies in the eigenspace of H's one nonzero eigenvalue
σ₀ = |a|²/K, so the relation is exact with u = xσ₀; on an MLP the two rank alike.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_methods import (
    LossFallsTask,
    correlation,
    exact_scores,
    exact_source_scores,
    make_inputs,
    mlp_trajectory,
    shared_input_case,
    shared_input_eigenvalue,
)

from attribution_core.errors import SettingsError
from attribution_core.methods.exact import flat_gradients
from attribution_core.methods.source import Source, SourceSettings, build_segments, r_factor
from attribution_core.numerics import curvature as curvature_module
from attribution_core.numerics.inputs import Segment
from attribution_core.numerics.segments import plan_segments


def segment_inputs(checkpoints, train_x, train_y, lr_sums, *, per_segment=2, **options):
    """Inputs whose segments take per_segment consecutive checkpoints each, with the given lr_sums."""
    segments = [Segment(checkpoints[i * per_segment : (i + 1) * per_segment], lr_sum) for i, lr_sum in enumerate(lr_sums)]
    return make_inputs(checkpoints, train_x, train_y, segments=segments, **options)


def fitted(inputs, **settings):
    """A Source with the inputs' segment count and the given settings, and its fitted state."""
    method = Source(SourceSettings(n_segments=len(inputs.segments), **settings))
    return method, method.fit(inputs)


def test_ekfac_source_equals_the_exact_reference_per_segment_where_the_factorisation_is_exact():
    checkpoints, train_x, train_y, query_x, query_y = shared_input_case(n_checkpoints=4)
    inputs = segment_inputs(checkpoints, train_x, train_y, [0.5, 3.0], batch_size=4)
    method, state = fitted(inputs, fisher="empirical")
    contributions = method.score_segments(state, inputs, query_x, query_y)
    expected = exact_source_scores(inputs, query_x, query_y)
    assert contributions.shape == (2, len(query_y), len(train_y))
    assert torch.allclose(contributions.double(), expected, rtol=1e-5, atol=1e-7 * expected.abs().max().item())


@pytest.mark.parametrize("lr_sum", [0.5, 1e3])
def test_one_segment_is_influence_with_damping_one_over_lr_sum_times_the_r_factor_ratio(lr_sum):
    checkpoints, train_x, train_y, query_x, query_y = shared_input_case()
    inputs = segment_inputs(checkpoints, train_x, train_y, [lr_sum], per_segment=1)
    method, state = fitted(inputs, fisher="empirical")
    u = lr_sum * shared_input_eigenvalue(train_x)
    ratio = -math.expm1(-u) * (1 + 1 / u)
    expected = ratio * exact_scores(inputs, query_x, query_y, damping=1 / lr_sum)
    scores = method.score(state, inputs, query_x, query_y).double()
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    if lr_sum > 100:  # the long-segment limit: plain influence with damping 1/x
        assert ratio == pytest.approx(1, abs=1e-3)


def test_one_long_segment_ranks_like_influence_with_damping_one_over_lr_sum_on_an_mlp():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory()
    inputs = segment_inputs(checkpoints[-1:], train_x, train_y, [100.0], per_segment=1)
    source = exact_source_scores(inputs, query_x, query_y)[0]
    assert correlation(source, exact_scores(inputs, query_x, query_y, damping=1 / 100)) > 0.99


def test_short_segments_approach_lr_weighted_gradient_dot_products():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory()
    lr_sums = [1e-4, 2e-4]
    inputs = segment_inputs(checkpoints, train_x, train_y, lr_sums)
    method, state = fitted(inputs)
    task, final = inputs.task, checkpoints[-1]
    query_grads = flat_gradients(final, task, query_x, query_y, "measurement").double()
    expected = sum(
        -(lr_sum / len(train_y)) * query_grads
        @ torch.stack([flat_gradients(m, task, train_x, train_y, "loss").double() for m in segment.models]).mean(0).T
        for lr_sum, segment in zip(lr_sums, inputs.segments)
    )
    scores = method.score(state, inputs, query_x, query_y).double()
    assert torch.allclose(scores, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_ekfac_source_is_close_to_the_exact_reference_on_an_mlp():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory()
    inputs = segment_inputs(checkpoints, train_x, train_y, [5.0, 5.0])  # 10 steps of lr 0.5 each
    method, state = fitted(inputs)
    expected = exact_source_scores(inputs, query_x, query_y)
    assert correlation(method.score(state, inputs, query_x, query_y), expected.sum(0)) > 0.9


def test_segment_contributions_sum_to_the_scores():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=30)
    inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0])
    method, state = fitted(inputs)
    contributions = method.score_segments(state, inputs, query_x, query_y)
    assert torch.allclose(contributions.sum(0), method.score(state, inputs, query_x, query_y))
    assert (contributions.abs().sum(dim=(1, 2)) > 0).all()


def test_self_influence_is_the_diagonal_of_pairwise_scores_for_the_loss_falling():
    checkpoints, train_x, train_y, _, _ = mlp_trajectory(n_train=20)
    inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0], task=LossFallsTask(), batch_size=7)
    method, state = fitted(inputs)
    pairwise = method.score(state, inputs, train_x, train_y)
    assert torch.allclose(method.self_influence(state, inputs), pairwise.diagonal(), rtol=1e-4, atol=1e-7)


def test_scores_do_not_depend_on_batch_or_query_block_size():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=30)
    scores = []
    for batch, block in [(64, 64), (7, 4)]:
        inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0], batch_size=batch)
        method, state = fitted(inputs, query_batch_size=block)
        scores.append(method.score(state, inputs, query_x, query_y))
    assert torch.allclose(scores[1], scores[0], rtol=1e-4, atol=1e-6 * scores[0].abs().max().item())


def test_scores_and_self_influence_do_not_depend_on_the_memory_budgets(monkeypatch):
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_checkpoints=6, n_train=20)
    inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0, 0.5], batch_size=8)
    method, state = fitted(inputs)
    expected = method.score_segments(state, inputs, query_x, query_y), method.self_influence(state, inputs)
    monkeypatch.setattr(curvature_module, "GRADIENT_BUDGET", 1)  # one example's gradient at a time
    monkeypatch.setattr(curvature_module, "QUERY_BUDGET", 1)  # one query per pass over the training set
    for value, reference in zip((method.score_segments(state, inputs, query_x, query_y), method.self_influence(state, inputs)), expected):
        assert torch.allclose(value, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


def test_projected_segment_contributions_average_to_the_exact_ones_over_projection_seeds():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0], batch_size=7)
    method, state = fitted(inputs, fisher="empirical")
    exact = method.score_segments(state, inputs, query_x, query_y)
    projected = []
    for seed in range(300):
        method, state = fitted(inputs, fisher="empirical", k=16, seed=seed)
        projected.append(method.score_segments(state, inputs, query_x, query_y))
    projected = torch.stack(projected)
    one_seed_error = ((projected - exact).flatten(1).norm(dim=1) / exact.norm()).mean()
    averaged_error = (projected.mean(dim=0) - exact).norm() / exact.norm()
    assert averaged_error < one_seed_error / 6  # unbiased in every segment: the error of the mean of 300 falls about 17-fold
    assert state["segment1/train_features"].shape == (20, 16)


def test_r_factor_is_continuous_at_zero_eigenvalue():
    values = r_factor(2.0)(torch.tensor([0.0, 1e-12, 1.0], dtype=torch.float64))
    assert torch.allclose(values, torch.tensor([2.0, 2.0, 1 - math.exp(-2.0)], dtype=torch.float64))


def test_build_segments_takes_the_planned_checkpoints_and_lr_sums():
    checkpoints = [object() for _ in range(4)]
    split = plan_segments([2, 4, 6, 8], [0, 0, 1, 1], np.full(8, 0.1), np.zeros(8), ["sgd"] * 8, n_segments=2)
    segments = build_segments(split.segments, checkpoints)
    assert [segment.models for segment in segments] == [checkpoints[:2], checkpoints[2:]]
    assert [segment.lr_sum for segment in segments] == pytest.approx([0.4, 0.4])


def test_missing_or_mismatched_segments_are_rejected():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_checkpoints=2, n_train=10)
    with pytest.raises(SettingsError, match="inputs.segments"):
        Source().fit(make_inputs(checkpoints, train_x, train_y))
    with pytest.raises(SettingsError, match="ask for 3"):
        Source().fit(segment_inputs(checkpoints, train_x, train_y, [1.0, 1.0], per_segment=1))


@pytest.mark.parametrize(
    "field, value",
    [("n_segments", 0), ("segments", []), ("fisher", "exact"), ("query_batch_size", 0), ("k", 0), ("kronecker_block", -1)],
)
def test_invalid_settings_are_rejected_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=field):
        SourceSettings(**{field: value})


@pytest.mark.parametrize("projection", [None, 16])
def test_progress_reaches_its_total_in_every_phase(projection):
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    reports = []
    inputs = segment_inputs(checkpoints, train_x, train_y, [1.0, 2.0], batch_size=6)
    inputs.progress = lambda done, total: reports.append((done, total))
    method = Source(SourceSettings(n_segments=2, query_batch_size=4, k=projection))
    phases = [lambda: method.fit(inputs)]
    state = method.fit(inputs)
    phases += [lambda: method.score(state, inputs, query_x, query_y), lambda: method.self_influence(state, inputs)]
    for phase in phases:
        reports.clear()
        phase()
        assert reports[-1][0] == reports[-1][1] and [done for done, _ in reports] == list(range(1, len(reports) + 1))
