"""One unit for every method that estimates removal: τ(z_q, z_i) ≈ f_q(trained with z_i) − f_q(trained without it).

f_q is the query's correct-class margin. Checked where the truth can be computed: an L2-regularised
softmax regression trained to convergence by full-batch gradient descent in float64, and its N
leave-one-out retrainings (the same initial weights, steps and learning rate, one example's loss
term dropped from the mean), all N + 1 trained at once as one batch of weight matrices. Exact
influence with damping = the regulariser's coefficient is the first-order expansion of exactly
this change, so it must match closely; EK-FAC (the same quantity, Kronecker-factored, with a
sampled-label Fisher), SOURCE (the unrolled trajectory, blind to the weight decay) and TRAK (its
ridge regression, rescaled by r̄) are approximations, held to the same sign and to the order of
magnitude: the median ratio of their scores to the actual changes, over each query's largest
changes, lies in [0.3, 3]. Self-influence is held to the same unit: for influence and SOURCE the
rise of the example's own loss when it is removed, for TRAK the drop of its own margin.

Replay differentiates the recorded run in the weight w_i of example i's loss terms (w_i = 0:
removed), so its scores are checked against order-keeping retraining with one example weighted 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers_methods import attribution_inputs
from helpers_units import (
    D_IN,
    LR,
    N_CHECKPOINTS,
    N_CLASSES,
    N_QUERIES,
    N_TRAIN,
    STEPS,
    TEACHER_SCALE,
    WEIGHT_DECAY,
    as_module,
    logits,
    teacher_data,
)
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from attribution_core import api
from attribution_core.data import DataSpec
from attribution_core.methods.base import Method
from attribution_core.methods.exact import ExactInfluence, ExactSettings
from attribution_core.methods.influence import Influence, InfluenceSettings
from attribution_core.methods.source import Source, SourceSettings, build_segments
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.models import ModelSpec
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.numerics.segments import plan_segments
from attribution_core.runs.replay_engine import replay_forward, replay_plan
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage
from attribution_core.runs.threads import one_thread
from attribution_core.runs.training import train
from attribution_core.store import Workspace
from attribution_core.task import correct_class_margin

TOP = 5
"""Each query's largest actual changes the ratios are taken over."""


@dataclass
class Removals:
    """The trained regression (float32 modules for the methods) and the actual effect of removing each example.

    margins: (n_queries, N) f_q(with z_i) − f_q(without z_i); own_loss: (N,) L_i(without) − L_i(with);
    own_margin: (N,) margin_i(with) − margin_i(without).
    """

    checkpoints: list[nn.Module]
    checkpoint_steps: list[int]
    x: torch.Tensor
    y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    margins: torch.Tensor
    own_loss: torch.Tensor
    own_margin: torch.Tensor








@pytest.fixture(scope="module")
def removals() -> Removals:
    generator = torch.Generator().manual_seed(0)
    teacher = TEACHER_SCALE * torch.randn(D_IN, N_CLASSES, generator=generator, dtype=torch.float64)
    x, y = teacher_data(generator, teacher, N_TRAIN)
    query_x, query_y = teacher_data(generator, teacher, N_QUERIES)
    keep = 1 - torch.cat([torch.zeros(1, N_TRAIN, dtype=torch.float64), torch.eye(N_TRAIN, dtype=torch.float64)])  # row 0: all kept
    onehot = F.one_hot(y, N_CLASSES).double()
    weights = 0.1 * torch.randn(N_CLASSES, D_IN + 1, generator=generator, dtype=torch.float64)
    # classes summing to 0: the direction adding the same to every logit, where only the weight decay pulls, stays at 0
    weights = (weights - weights.mean(dim=0)).expand(N_TRAIN + 1, -1, -1)
    checkpoints, steps = [], []
    with one_thread():  # tiny products: a second thread only contends
        for step in range(1, STEPS + 1):  # gradient descent on (1/N) Σ_i keep_i L_i + (WEIGHT_DECAY / 2) ‖θ‖², by hand
            residuals = keep[..., None] * (torch.softmax(logits(weights, x), dim=-1) - onehot)
            gradient = residuals.transpose(1, 2) @ F.pad(x, (0, 1), value=1.0) / N_TRAIN + WEIGHT_DECAY * weights
            weights = weights - LR * gradient
            if step % (STEPS // N_CHECKPOINTS) == 0:
                checkpoints.append(as_module(weights[0]))
                steps.append(step)
    assert gradient.abs().max() < 1e-8  # converged: the removals' effects are those of the optima
    own, query = logits(weights, x), logits(weights, query_x)
    kept, removed = own[0], own[1:].diagonal(dim1=0, dim2=1).T  # removed[i]: example i's logits without it
    query_margins = correct_class_margin(query.flatten(0, 1), query_y.repeat(N_TRAIN + 1)).reshape(N_TRAIN + 1, N_QUERIES)
    return Removals(
        checkpoints, steps, x.float(), y, query_x.float(), query_y,
        margins=(query_margins[0] - query_margins[1:]).T,
        own_loss=F.cross_entropy(removed, y, reduction="none") - F.cross_entropy(kept, y, reduction="none"),
        own_margin=correct_class_margin(kept, y) - correct_class_margin(removed, y),
    )


def top_ratios(scores: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Ratios score / actual change over each row's TOP largest actual changes: (n_rows * TOP,)."""
    rows = torch.atleast_2d(actual).double()
    top = rows.abs().argsort(dim=1, descending=True)[:, :TOP]
    return (torch.atleast_2d(scores).double().gather(1, top) / rows.gather(1, top)).flatten()


def inputs_at_the_end(removals: Removals) -> AttributionInputs:
    """Inputs at the converged regression alone."""
    return attribution_inputs(removals.checkpoints[-1:], removals.x, removals.y, batch_size=N_TRAIN)


def source_inputs(removals: Removals) -> AttributionInputs:
    """Inputs over the trajectory's checkpoints with SOURCE's default segments, planned from the steps and learning rates."""
    split = plan_segments(removals.checkpoint_steps, [0] * N_CHECKPOINTS, np.full(STEPS, LR), np.zeros(STEPS), ["sgd"] * STEPS,
                          n_segments=SourceSettings().n_segments)
    inputs = attribution_inputs(removals.checkpoints, removals.x, removals.y, batch_size=N_TRAIN)
    inputs.segments = build_segments(split.segments, removals.checkpoints)
    return inputs


def scores_and_self_influence(method: Method, inputs: AttributionInputs, removals: Removals) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's scores of the queries (n_queries, N) and its self-influence (N,)."""
    state = method.fit(inputs)
    return method.score(state, inputs, removals.query_x, removals.query_y), method.self_influence(state, inputs)


def test_exact_influence_is_the_leave_one_out_change_of_the_margin(removals):
    method = ExactInfluence(ExactSettings(damping=WEIGHT_DECAY))  # the regulariser's curvature: the exact objective's
    scores, self_influence = scores_and_self_influence(method, inputs_at_the_end(removals), removals)
    assert torch.corrcoef(torch.stack([scores.flatten().double(), removals.margins.flatten()]))[0, 1] > 0.99
    assert ((top_ratios(scores, removals.margins) - 1).abs() < 0.2).all()  # first order: the largest removals stray most
    assert ((top_ratios(self_influence, removals.own_loss) - 1).abs() < 0.2).all()


@dataclass(frozen=True)
class Approximation:
    """A method under test: how to build it, its inputs, and the actual change its self-influence estimates."""

    method: Callable[[], Method]
    inputs: Callable[[Removals], AttributionInputs]
    own_change: Callable[[Removals], torch.Tensor]


APPROXIMATIONS = {
    # EK-FAC with the regulariser's curvature as its damping: the quantity exact influence computes, approximated
    "ekfac": Approximation(lambda: Influence(InfluenceSettings(damping=WEIGHT_DECAY)), inputs_at_the_end,
                           lambda removals: removals.own_loss),
    "source": Approximation(lambda: Source(SourceSettings()), source_inputs, lambda removals: removals.own_loss),
    # the model is its own features (no projection needed); TRAK's own ridge, over its default last five checkpoints
    "trak": Approximation(lambda: Trak(TrakSettings(projection="identity")),
                          lambda removals: attribution_inputs(removals.checkpoints[-5:], removals.x, removals.y, batch_size=N_TRAIN),
                          lambda removals: removals.own_margin),
}


@pytest.mark.parametrize("name", list(APPROXIMATIONS))
def test_approximations_estimate_the_change_of_the_margin_to_its_order_of_magnitude(removals, name):
    approximation = APPROXIMATIONS[name]
    scores, self_influence = scores_and_self_influence(approximation.method(), approximation.inputs(removals), removals)
    ratios = top_ratios(scores, removals.margins)
    assert (ratios > 0).float().mean() >= 0.8  # the same sign on the largest changes
    assert 0.3 <= ratios.median() <= 3
    assert 0.3 <= top_ratios(self_influence, approximation.own_change(removals)).median() <= 3


def test_replay_scores_are_the_change_of_retraining_with_one_example_weighted_zero(tmp_path):
    data = DataSpec(source="digits", test_size=20, split_seed=0, max_train=60)
    recipe = Recipe((Stage(epochs=2, lr=0.05, momentum=0.9, batch_size=16),), seed=0, checkpoints=CheckpointPolicy(every_epochs=1))
    run = train(data, ModelSpec("mlp", {"hidden": [8]}), recipe, Workspace(tmp_path), "replay-units")
    queries = [0, 1]
    scores = torch.as_tensor(api.attribute(run, "replay", queries=queries, device="cpu").values)
    plan = replay_plan(run)
    _, test_set = run.datasets()

    def margins(weights: torch.Tensor | None) -> torch.Tensor:
        final, _ = replay_forward(plan, weights, verify=False)
        return plan.task.measurement(lambda x: functional_call(plan.model, final, (x,)), test_set.x[queries], test_set.y[queries])

    trained = margins(None)
    ratios = []
    for row in range(len(queries)):
        for example in scores[row].abs().argsort(descending=True)[:3].tolist():
            weights = torch.ones(len(plan.train_y))
            weights[example] = 0
            ratios.append(scores[row, example] / (trained[row] - margins(weights)[row]))
    assert 0.5 < min(ratios) and max(ratios) < 2  # a derivative against a removal of one in 60: the same unit, to first order
