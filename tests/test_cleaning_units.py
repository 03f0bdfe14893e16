"""A cleaning plan's predicted margin changes against exact retraining of an L2-regularised softmax regression.

The truth: the regression of tests/test_score_units.py (float64 full-batch gradient descent to a
gradient below 1e-8), retrained with each example relabelled to another class (relabel-one-out),
and with small plans that relabel some examples and remove others, all models trained at once as
one batch of weight matrices. The prediction: cleaning.predict.margin_change over exact influence
(damping = the regulariser's coefficient) fitted with the given labels and, for the relabelled
examples, fitted with the plan's labels, the generic design the module describes. Exact influence
is the first-order expansion of these changes, so it is held to the tolerance test_score_units.py
holds removals to: correlation above 0.99, and within 20 % on each query's largest changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers_methods import attribution_inputs
from helpers_units import (
    D_IN,
    LR,
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
from torch.nn import functional as F

from attribution_core.cleaning.predict import margin_change
from attribution_core.methods.exact import ExactInfluence, ExactSettings
from attribution_core.runs.threads import one_thread
from attribution_core.task import correct_class_margin

N_PLANS, PLAN_RELABELS, PLAN_REMOVALS = 12, 3, 2


@dataclass
class Regression:
    """The data, the model trained on it, and the query margins of every retrained variant."""

    x: torch.Tensor
    y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    final: torch.nn.Module
    query_margins: torch.Tensor
    """(n_queries,) the margins of the model trained on everything as given."""


def train_regressions(x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """M regressions [W | b] (M, K, D + 1) trained on (x, labels[m]) with loss weights keep[m] (M, N) (0: removed), at once."""
    onehot = F.one_hot(labels, N_CLASSES).double()
    weights = initial.expand(len(labels), -1, -1)
    with one_thread():  # tiny products: a second thread only contends
        for _ in range(STEPS):  # gradient descent on (1/N) Σ_i keep_i L_i + (WEIGHT_DECAY / 2) ‖θ‖², by hand
            residuals = keep[..., None] * (torch.softmax(logits(weights, x), dim=-1) - onehot)
            gradient = residuals.transpose(1, 2) @ F.pad(x, (0, 1), value=1.0) / N_TRAIN + WEIGHT_DECAY * weights
            weights = weights - LR * gradient
    assert gradient.abs().max() < 1e-8
    return weights


def margins_of(weights: torch.Tensor, regression: Regression) -> torch.Tensor:
    """(M, n_queries) query margins of M trained regressions."""
    query = logits(weights, regression.query_x)
    return correct_class_margin(query.flatten(0, 1), regression.query_y.repeat(len(weights))).reshape(len(weights), -1)


@pytest.fixture(scope="module")
def setup() -> tuple[Regression, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    teacher = TEACHER_SCALE * torch.randn(D_IN, N_CLASSES, generator=generator, dtype=torch.float64)
    x, y = teacher_data(generator, teacher, N_TRAIN)
    query_x, query_y = teacher_data(generator, teacher, N_QUERIES)
    initial = 0.1 * torch.randn(N_CLASSES, D_IN + 1, generator=generator, dtype=torch.float64)
    initial = initial - initial.mean(dim=0)  # classes summing to 0, as in test_score_units
    trained = train_regressions(x, y[None], torch.ones(1, N_TRAIN, dtype=torch.float64), initial)
    regression = Regression(x, y, query_x, query_y, as_module(trained[0]), torch.zeros(0))
    regression.query_margins = margins_of(trained, regression)[0]
    return regression, initial


def exact_scores(regression: Regression, labels: torch.Tensor) -> np.ndarray:
    """(n_queries, N) exact influence at the trained model, fitted with training labels `labels` (N,)."""
    inputs = attribution_inputs([regression.final], regression.x.float(), labels, batch_size=N_TRAIN)
    method = ExactInfluence(ExactSettings(damping=WEIGHT_DECAY))  # the regulariser's curvature: the exact objective's
    return method.score(method.fit(inputs), inputs, regression.query_x.float(), regression.query_y).double().numpy()


def top_ratios(predicted: np.ndarray, actual: np.ndarray, top: int = 5) -> np.ndarray:
    """Predicted / actual change over each query's `top` largest actual changes: predicted, actual (n_queries, M)."""
    order = np.argsort(-np.abs(actual), axis=1)[:, :top]
    return (np.take_along_axis(predicted, order, 1) / np.take_along_axis(actual, order, 1)).ravel()


def test_relabelling_one_example_moves_the_margins_as_the_relabelled_fit_predicts(setup):
    regression, initial = setup
    other = (regression.y + 1 + torch.arange(N_TRAIN) % (N_CLASSES - 1)) % N_CLASSES  # another class for each example
    labels = regression.y.repeat(N_TRAIN, 1)
    labels[torch.arange(N_TRAIN), torch.arange(N_TRAIN)] = other  # model i: example i relabelled, the rest as given
    retrained = train_regressions(regression.x, labels, torch.ones(N_TRAIN, N_TRAIN, dtype=torch.float64), initial)
    actual = (margins_of(retrained, regression) - regression.query_margins).T.numpy()  # (n_queries, N)
    given, relabelled = exact_scores(regression, regression.y), exact_scores(regression, other)
    # each example's relabel alone: a plan of one. Gauss–Newton curvature reads no label, so fitting with every example's
    # other class at once gives each one's relabelled score as a fit with only its own label changed would
    predicted = np.stack([margin_change(given, np.array([], dtype=int), np.array([i]), relabelled) for i in range(N_TRAIN)], axis=1)
    assert np.corrcoef(predicted.ravel(), actual.ravel())[0, 1] > 0.99
    assert (np.abs(top_ratios(predicted, actual) - 1) < 0.2).all()
    assert not np.allclose(predicted, -given)  # a relabel is not a removal: the added example counts


def test_plans_of_relabels_and_removals_move_the_margins_as_predicted(setup):
    regression, initial = setup
    generator = np.random.default_rng(0)
    labels, keep, plans = regression.y.repeat(N_PLANS, 1), torch.ones(N_PLANS, N_TRAIN, dtype=torch.float64), []
    for plan in range(N_PLANS):
        chosen = generator.choice(N_TRAIN, size=PLAN_RELABELS + PLAN_REMOVALS, replace=False)
        relabelled, removed = chosen[:PLAN_RELABELS], chosen[PLAN_RELABELS:]
        labels[plan, relabelled] = (regression.y[relabelled] + torch.as_tensor(generator.integers(1, N_CLASSES, PLAN_RELABELS))) % N_CLASSES
        keep[plan, removed] = 0
        plans.append((relabelled, removed))
    actual = (margins_of(train_regressions(regression.x, labels, keep, initial), regression) - regression.query_margins).T.numpy()
    given = exact_scores(regression, regression.y)
    predicted = np.stack([margin_change(given, removed, relabelled, exact_scores(regression, labels[plan]))
                          for plan, (relabelled, removed) in enumerate(plans)], axis=1)
    removal_only = np.stack([margin_change(given, np.concatenate([removed, relabelled]), np.array([], dtype=int), None)
                             for relabelled, removed in plans], axis=1)
    assert np.corrcoef(predicted.ravel(), actual.ravel())[0, 1] > 0.99
    assert (np.abs(top_ratios(predicted, actual) - 1) < 0.2).all()
    # removing the relabelled examples instead is another plan, and the prediction tells the two apart
    assert np.abs(removal_only - actual).mean() > 3 * np.abs(predicted - actual).mean()
