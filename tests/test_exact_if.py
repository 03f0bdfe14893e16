"""Exact influence against a hand-rolled numpy computation (against leave-one-out retraining: test_score_units.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_methods import attribution_inputs, cnn, data, loop_gradients, mlp
from torch import nn

from attribution_core.errors import SettingsError
from attribution_core.methods.exact import (
    ExactInfluence,
    ExactSettings,
    damped_inverse,
    flat_gradients,
    from_layout,
    gauss_newton_matrix,
    hessian_matrix,
    to_layout,
    tracked_parameters,
)
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.task import Task

TASK = Task()


def softmax_regression(seed: int = 0, d_in: int = 4, n_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, n_classes)).eval()


def numpy_softmax_regression(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Loss gradients, margin gradients (n, P) and the Gauss–Newton matrix (P, P) by hand, in numpy."""
    theta = np.concatenate([model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()[:, None]], axis=1)
    inputs = np.concatenate([x.double().numpy(), np.ones((len(x), 1))], axis=1)  # x̃ = [x, 1]
    labels = y.numpy()
    logits = inputs @ theta.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(theta.shape[0])[labels]
    others = np.where(onehot == 1, -np.inf, logits)
    r = np.exp(others - others.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)  # softmax over the wrong classes: ∂ logsumexp_{j≠y} / ∂ logit
    loss_grads = np.einsum("nk,ni->nki", p - onehot, inputs).reshape(len(x), -1)
    margin_grads = np.einsum("nk,ni->nki", onehot - r, inputs).reshape(len(x), -1)
    gauss_newton = np.mean(
        [np.kron(np.diag(p_n) - np.outer(p_n, p_n), np.outer(a_n, a_n)) for p_n, a_n in zip(p, inputs)], axis=0
    )
    return loss_grads, margin_grads, gauss_newton


def fit_and_score(settings, models, x, y, query_x, query_y, **options):
    method, inputs = ExactInfluence(settings), attribution_inputs(models, x, y, **options)
    state = method.fit(inputs)
    return method, state, inputs, method.score(state, inputs, query_x, query_y)


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_exact_influence_of_softmax_regression_matches_numpy(curvature):
    model = softmax_regression()
    x, y = data(25, (4,))
    query_x, query_y = data(5, (4,), seed=1)
    settings = ExactSettings(curvature=curvature, damping=0.05)
    method, state, inputs, scores = fit_and_score(settings, [model], x, y, query_x, query_y, batch_size=6)
    loss_grads, _, gauss_newton = numpy_softmax_regression(model, x, y)
    _, query_grads, _ = numpy_softmax_regression(model, query_x, query_y)
    inverse = np.linalg.inv(gauss_newton + 0.05 * np.eye(len(gauss_newton)))  # linear model: Hessian = GN
    np.testing.assert_allclose(scores.numpy(), -query_grads @ inverse @ loss_grads.T / len(y), rtol=1e-4, atol=1e-7)
    expected_self = np.einsum("np,pq,nq->n", loss_grads, inverse, loss_grads) / len(y)
    np.testing.assert_allclose(method.self_influence(state, inputs).numpy(), expected_self, rtol=1e-4)


def test_reference_helpers_match_numpy_on_softmax_regression():
    model = softmax_regression()
    x, y = data(10, (4,))
    loss_grads, margin_grads, gauss_newton = numpy_softmax_regression(model, x, y)
    np.testing.assert_allclose(flat_gradients(model, TASK, x, y, "loss").numpy(), loss_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat_gradients(model, TASK, x, y, "measurement").numpy(), margin_grads, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gauss_newton_matrix(model, TASK, x, y, batch_size=3).numpy(), gauss_newton, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hessian_matrix(model, TASK, x, y, batch_size=4).numpy(), gauss_newton, rtol=1e-5, atol=1e-7)


def test_a_training_example_queried_with_its_label_supports_itself():
    model = mlp()
    x, y = data(20, (6,))
    _, _, _, scores = fit_and_score(ExactSettings(), [model], x, y, x, y)
    assert (scores.diagonal() > 0).all()


def test_gauss_newton_of_an_mlp_matches_jacobians_by_autograd():
    model = mlp()
    x, y = data(6, (6,))
    parameters = [p for module in TASK.tracked_modules(model).values() for p in (module.weight, module.bias)]
    expected = 0
    for i in range(len(y)):
        logits = model(x[i : i + 1])[0]
        jacobian = torch.stack([_layout_row(torch.autograd.grad(logit, parameters, retain_graph=True)) for logit in logits])
        p = torch.softmax(logits.detach(), 0)
        expected = expected + jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
    torch.testing.assert_close(gauss_newton_matrix(model, TASK, x, y).float(), expected.detach() / len(y), rtol=1e-4, atol=1e-6)


def _layout_row(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(weight, bias, weight, bias, ...) gradients as one row in the core's layout."""
    return torch.cat([torch.cat([w.reshape(w.shape[0], -1), b[:, None]], 1).flatten() for w, b in zip(grads[::2], grads[1::2])])


def test_hessian_of_a_cnn_matches_finite_differences_of_gradients():
    torch.set_default_dtype(torch.float64)
    try:
        model = cnn()
        x, y = data(5, (2, 6, 6))
        hessian = hessian_matrix(model, TASK, x, y, batch_size=2)
        direction = torch.randn(len(hessian), generator=torch.Generator().manual_seed(0))
        modules = TASK.tracked_modules(model)
        flat = to_layout(modules, tracked_parameters(model, TASK), leading=0)
        mean_gradients = []
        for sign in (1, -1):
            with torch.no_grad():
                for name, value in from_layout(modules, flat + sign * 1e-5 * direction).items():
                    model.get_parameter(name).copy_(value)
            mean_gradients.append(loop_gradients(model, x, y, "loss").mean(0))
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(hessian @ direction, (mean_gradients[0] - mean_gradients[1]) / 2e-5, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hessian, hessian.T)


def test_layout_round_trip_covers_models_that_are_a_single_layer():
    for model in [nn.Linear(3, 2), mlp(), cnn()]:
        modules = TASK.tracked_modules(model)
        parameters = tracked_parameters(model, TASK)
        flat = to_layout(modules, parameters, leading=0)
        assert len(flat) == sum(p.numel() for p in parameters.values())
        for name, value in from_layout(modules, flat).items():
            torch.testing.assert_close(value, parameters[name])


def test_indefinite_curvature_without_absolute_eigenvalues_is_refused():
    curvature = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    with pytest.raises(SettingsError, match="damping"):
        damped_inverse(curvature, 0.5)
    torch.testing.assert_close(damped_inverse(curvature, 0.5, absolute_eigenvalues=True),
                               torch.diag(torch.tensor([0.4, 1 / 1.5], dtype=torch.float64)))


@pytest.mark.parametrize("field, value", [("curvature", "fisher"), ("damping", -0.1)])
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=f"{field}="):
        ExactSettings(**{field: value})


@pytest.mark.badinput
def test_exact_influence_refuses_models_too_large_for_an_explicit_curvature():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(160, 128)).eval()  # 20,608 parameters
    inputs = AttributionInputs([model], [0.1], torch.zeros(4, 1, 10, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(SettingsError, match="20608 x 20608.*at most 20000.*use ekfac"):
        ExactInfluence().fit(inputs)
