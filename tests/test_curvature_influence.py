"""K-FAC / EK-FAC curvature and influence: exact where the factorisation is exact, close elsewhere.

The exact case: one Linear layer whose training examples all share one input x0 (balanced labels,
bias set so the logits at x0 are equal). Then A = a aᵀ is rank one, so the curvature block is
exactly S ⊗ A and diagonal in the Kronecker eigenbasis (EK-FAC and K-FAC are exact), and the
empirical label frequencies equal the model's predictions, so the empirical Fisher S = E[g gᵀ]
equals the Gauss–Newton output Hessian diag(p) − ppᵀ: fisher="empirical" gives the exact
Gauss–Newton influence, deterministically.
"""
from __future__ import annotations

import pytest
import torch
from helpers_methods import N_CLASSES, LossFallsTask, correlation, exact_scores, make_inputs, mlp_trajectory, shared_input_case
from torch import nn

from attribution_core.errors import SettingsError
from attribution_core.methods.exact import flat_gradients
from attribution_core.methods.influence import Influence, InfluenceSettings
from attribution_core.numerics import curvature as curvature_module
from attribution_core.numerics.curvature import (
    LayerBasis,
    Scratch,
    basis_change,
    eigenbasis,
    fit_corrected_eigenvalues,
    fit_covariances,
    label_uniforms,
    rotated_gradients,
    sandwich,
)
from attribution_core.numerics.gradients import LayerBatch
from attribution_core.task import sample_labels


def fit_and_score(settings, inputs, query_x, query_y, method=Influence):
    """Fitted scores (n_queries, n_train) as float64, to compare with the exact references."""
    method = method(settings)
    return method.score(method.fit(inputs), inputs, query_x, query_y).double()




@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_equals_exact_gauss_newton_influence_where_the_kronecker_factorisation_is_exact(curvature):
    models, train_x, train_y, query_x, query_y = shared_input_case()
    inputs = make_inputs(models, train_x, train_y)
    settings = InfluenceSettings(curvature=curvature, fisher="empirical", damping=0.05)
    expected = exact_scores(inputs, query_x, query_y, damping=0.05)
    assert torch.allclose(fit_and_score(settings, inputs, query_x, query_y), expected, rtol=1e-4, atol=1e-6)


def test_ekfac_is_close_to_exact_gauss_newton_influence_on_a_tiny_mlp():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory()
    inputs = make_inputs(checkpoints[-1:], train_x, train_y)
    # λ = 0.1 is an eighth of G's top eigenvalue here; with less damping the block-diagonal
    # approximation alone (ignoring cross-layer curvature) drops below 0.95 correlation
    expected = exact_scores(inputs, query_x, query_y, damping=0.1)
    for curvature in ("ekfac", "kfac"):
        scores = fit_and_score(InfluenceSettings(curvature=curvature, damping=0.1), inputs, query_x, query_y)
        assert correlation(scores, expected) > 0.9, curvature


def test_corrected_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_eigenbasis_for_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, N_CLASSES)).double().eval()
    train_x, train_y = torch.randn(10, 2, 4, 4, dtype=torch.float64), torch.arange(10) % N_CLASSES
    inputs = make_inputs([model], train_x, train_y, batch_size=4)
    bases = eigenbasis(fit_covariances([model], inputs, fisher="empirical"))
    eigenvalues = fit_corrected_eigenvalues(model, bases, inputs, fisher="empirical")
    gradients = flat_gradients(model, inputs.task, train_x, train_y, "loss")
    offset = 0
    for name, basis in bases.items():
        d_out, d_in = len(basis.q_out), len(basis.q_in)
        layer_grads = gradients[:, offset : offset + d_out * d_in].reshape(-1, d_out, d_in)
        expected = (basis.q_out.T @ layer_grads @ basis.q_in).square().mean(dim=0)
        assert torch.allclose(eigenvalues[name], expected, rtol=1e-6, atol=1e-12), name
        offset += d_out * d_in


def test_scores_of_a_cnn_equal_the_explicit_ekfac_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4, N_CLASSES)).double().eval()
    train_x, train_y = torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.arange(12) % N_CLASSES
    query_x, query_y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    inputs = make_inputs([model], train_x, train_y, batch_size=5)
    method = Influence(InfluenceSettings())
    state = method.fit(inputs)
    blocks = []
    for name in ("0", "3"):
        rotation = torch.kron(state[f"{name}/q_out"], state[f"{name}/q_in"]).double()
        damped = state[f"{name}/eigenvalues"].flatten().double() + state[f"{name}/damping"].double()
        blocks.append(rotation @ torch.diag(1 / damped) @ rotation.T)
    inverse = torch.block_diag(*blocks)
    query_grads = flat_gradients(model, inputs.task, query_x, query_y, "measurement")
    train_grads = flat_gradients(model, inputs.task, train_x, train_y, "loss")
    expected = -query_grads @ inverse @ train_grads.T / len(train_y)
    assert torch.allclose(method.score(state, inputs, query_x, query_y).double(), expected, rtol=1e-4, atol=1e-7)
    expected_self = ((train_grads @ inverse) * train_grads).sum(dim=1) / len(train_y)
    assert torch.allclose(method.self_influence(state, inputs).double(), expected_self, rtol=1e-4)


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_self_influence_is_the_diagonal_of_pairwise_scores_for_the_loss_falling(curvature):
    checkpoints, train_x, train_y, _, _ = mlp_trajectory(n_train=20)
    inputs = make_inputs(checkpoints[-1:], train_x, train_y, task=LossFallsTask(), batch_size=7)
    method = Influence(InfluenceSettings(curvature=curvature))
    state = method.fit(inputs)
    pairwise = method.score(state, inputs, train_x, train_y)
    self_influence = method.self_influence(state, inputs)
    assert torch.allclose(self_influence, pairwise.diagonal(), rtol=1e-4, atol=1e-6)
    assert (self_influence > 0).all()


def test_scores_do_not_depend_on_batch_or_query_block_size():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=40)
    scores = [
        fit_and_score(InfluenceSettings(query_batch_size=query_block), make_inputs(checkpoints[-1:], train_x, train_y, batch_size=batch),
                      query_x, query_y)
        for batch, query_block in [(64, 64), (7, 4), (1, 1)]
    ]
    for other in scores[1:]:  # float32 sums in another order: equal to rounding
        assert torch.allclose(other, scores[0], rtol=1e-4, atol=1e-6 * scores[0].abs().max().item())


def test_projected_scores_average_to_the_exact_scores_over_projection_seeds():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    inputs = make_inputs(checkpoints[-1:], train_x, train_y, batch_size=7)
    exact = fit_and_score(InfluenceSettings(fisher="empirical"), inputs, query_x, query_y)
    projected = torch.stack([
        fit_and_score(InfluenceSettings(fisher="empirical", k=16, seed=seed), inputs, query_x, query_y) for seed in range(300)
    ])
    one_seed_error = ((projected - exact).flatten(1).norm(dim=1) / exact.norm()).mean()
    averaged_error = (projected.mean(dim=0) - exact).norm() / exact.norm()
    assert averaged_error < one_seed_error / 6  # unbiased: the error of the mean of 300 falls about 17-fold, a bias would not


def test_projected_scoring_stores_n_by_k_features_and_keeps_exact_self_influence():
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    inputs = make_inputs(checkpoints[-1:], train_x, train_y, batch_size=7)
    exact_method, projected_method = Influence(), Influence(InfluenceSettings(k=64))
    exact_state, projected_state = exact_method.fit(inputs), projected_method.fit(inputs)
    assert projected_state["train_features"].shape == (20, 64) and "train_features" not in exact_state
    torch.testing.assert_close(projected_method.self_influence(projected_state, inputs), exact_method.self_influence(exact_state, inputs))
    assert correlation(projected_method.score(projected_state, inputs, query_x, query_y),
                       exact_method.score(exact_state, inputs, query_x, query_y)) > 0.6
    with pytest.raises(SettingsError, match="k=32"):
        Influence(InfluenceSettings(k=32)).score(projected_state, inputs, query_x, query_y)


def random_basis(d_out: int, d_in: int, seed: int) -> LayerBasis:
    """A LayerBasis of random orthogonal float64 matrices (eigenvalues unused)."""
    generator = torch.Generator().manual_seed(seed)
    q_out, q_in = (torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0] for d in (d_out, d_in))
    return LayerBasis(q_in, q_out, torch.ones(d_in, dtype=torch.float64), torch.ones(d_out, dtype=torch.float64))


@pytest.mark.parametrize("positions", [1, 3])  # 2 captures × 1 position: rotate the factors; × 3: the summed gradient
def test_rotated_gradients_are_the_mean_over_captures_of_the_rotated_per_example_gradients(positions):
    generator = torch.Generator().manual_seed(positions)
    basis = random_basis(3, 4, seed=positions)
    layers = [
        LayerBatch("layer", torch.randn(5, positions, 4, generator=generator, dtype=torch.float64),
                   torch.randn(5, positions, 3, generator=generator, dtype=torch.float64))
        for _ in range(2)
    ]
    expected = torch.stack([basis.q_out.T @ layer.per_example_gradients() @ basis.q_in for layer in layers]).mean(dim=0)
    assert torch.allclose(rotated_gradients(layers, basis), expected)
    assert torch.allclose(rotated_gradients(layers, basis, Scratch(), "key"), expected)


def test_basis_change_equals_leaving_one_basis_and_entering_the_other():
    source, target = random_basis(3, 4, seed=0), random_basis(3, 4, seed=1)
    coordinates = torch.randn(2, 3, 4, dtype=torch.float64)
    matrices = source.q_out @ coordinates @ source.q_in.T
    left, right = basis_change(source, target)
    assert torch.allclose(sandwich(left, coordinates, right), target.rotate(matrices))


def test_scores_and_self_influence_do_not_depend_on_the_memory_budgets(monkeypatch):
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    inputs = make_inputs(checkpoints[-1:], train_x, train_y, batch_size=8)
    method = Influence()
    state = method.fit(inputs)
    expected = method.score(state, inputs, query_x, query_y), method.self_influence(state, inputs)
    monkeypatch.setattr(curvature_module, "GRADIENT_BUDGET", 1)  # one example's gradient at a time
    monkeypatch.setattr(curvature_module, "QUERY_BUDGET", 1)  # one query per pass over the training set
    for value, reference in zip((method.score(state, inputs, query_x, query_y), method.self_influence(state, inputs)), expected):
        assert torch.allclose(value, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


def test_true_fisher_labels_follow_the_model_predictions_and_the_seed():
    logits = torch.tensor([[2.0, 0.0, -1.0]]).expand(20000, 3)
    labels = sample_labels(logits, label_uniforms(20000, (7,)))
    frequencies = torch.bincount(labels, minlength=3).double() / 20000
    assert torch.allclose(frequencies, torch.softmax(logits[0].double(), 0), atol=0.01)
    assert torch.equal(labels, sample_labels(logits, label_uniforms(20000, (7,))))
    assert not torch.equal(labels, sample_labels(logits, label_uniforms(20000, (8,))))


def test_true_fisher_approaches_gauss_newton_influence_with_many_samples():
    models, train_x, train_y, query_x, query_y = shared_input_case(n_per_class=2000)
    inputs = make_inputs(models, train_x, train_y, batch_size=4096)
    expected = exact_scores(inputs, query_x, query_y, damping=0.05)
    scores = fit_and_score(InfluenceSettings(fisher="true_fisher", damping=0.05), inputs, query_x, query_y)
    assert torch.allclose(scores, expected, rtol=0.05, atol=0.01 * expected.abs().max().item())


def test_default_damping_is_each_layers_mean_eigenvalue():
    checkpoints, train_x, train_y, _, _ = mlp_trajectory(n_train=20)
    state = Influence().fit(make_inputs(checkpoints[-1:], train_x, train_y))
    for name in ("0", "2"):
        assert state[f"{name}/damping"].item() == pytest.approx(state[f"{name}/eigenvalues"].mean().item())


@pytest.mark.parametrize(
    "field, value",
    [("curvature", "diagonal"), ("damping", 0.0), ("damping_ratio", -1.0), ("fisher", "sampled"), ("query_batch_size", 0),
     ("k", 0), ("kronecker_block", -1)],
)
def test_invalid_settings_are_rejected_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=field):
        InfluenceSettings(**{field: value})


@pytest.mark.parametrize("projection", [None, 16])
def test_progress_reaches_its_total_in_every_phase(projection):
    checkpoints, train_x, train_y, query_x, query_y = mlp_trajectory(n_train=20)
    reports = []
    inputs = make_inputs(checkpoints[-1:], train_x, train_y, batch_size=6)
    inputs.progress = lambda done, total: reports.append((done, total))
    method = Influence(InfluenceSettings(query_batch_size=4, k=projection))
    phases = [lambda: method.fit(inputs)]
    state = method.fit(inputs)
    phases += [lambda: method.score(state, inputs, query_x, query_y), lambda: method.self_influence(state, inputs)]
    for phase in phases:
        reports.clear()
        phase()
        assert reports[-1][0] == reports[-1][1] and [done for done, _ in reports] == list(range(1, len(reports) + 1))
