"""TracIn and the baselines against direct computations from autograd gradients."""
from __future__ import annotations

import pytest
import torch
from helpers_methods import attribution_inputs, cnn, data, loop_gradients, mlp, token_model
from torch.nn import functional as F

from attribution_core.errors import SettingsError
from attribution_core.methods.baselines import (
    GradientCosine,
    GradientDot,
    GradientSimilaritySettings,
    RepresentationSettings,
    RepresentationSimilarity,
)
from attribution_core.methods.tracin import TracIn, TracInSettings


def wide_token_model(seed: int = 0):
    """Wide enough that its per-position Linear layer takes the factored Σ_{t,t'} (g·g')(a·a') path."""
    return token_model(seed, d_in=20, hidden=30)


# Linear (factored), conv (per-example gradients), Linear over positions (both paths)
MODELS_AND_SHAPES = [(mlp, (6,)), (cnn, (2, 6, 6)), (token_model, (3, 4)), (wide_token_model, (3, 20))]


def direct_dot(model, query_x, query_y, train_x, train_y) -> torch.Tensor:
    """∇f(z_q)ᵀ∇L(z_m) (n_queries, n_train) from autograd per-example gradients."""
    return loop_gradients(model, query_x, query_y, "measurement") @ loop_gradients(model, train_x, train_y, "loss").T


def fit_and_score(method, models, x, y, query_x, query_y, **options):
    inputs = attribution_inputs(models, x, y, **options)
    state = method.fit(inputs)
    return state, inputs, method.score(state, inputs, query_x, query_y)


@pytest.mark.parametrize("make_model, shape", MODELS_AND_SHAPES)
def test_tracin_equals_the_learning_rate_weighted_sum_of_gradient_dots(make_model, shape):
    models = [make_model(seed=0), make_model(seed=1), make_model(seed=2)]
    x, y = data(13, shape)
    query_x, query_y = data(4, shape, seed=1)
    lrs = [0.5, 0.2, 0.05]
    state, inputs, scores = fit_and_score(TracIn(), models, x, y, query_x, query_y, lrs=lrs, batch_size=5)
    expected = -sum(lr * direct_dot(model, query_x, query_y, x, y) for model, lr in zip(models, lrs))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    expected_self = sum(lr * loop_gradients(model, x, y, "loss").square().sum(1) for model, lr in zip(models, lrs))
    torch.testing.assert_close(TracIn().self_influence(state, inputs), expected_self, rtol=1e-4, atol=1e-6)


def test_projected_tracin_approximates_exact_tracin_and_keeps_exact_self_influence():
    models = [mlp(seed=0, d_in=20, hidden=16), mlp(seed=1, d_in=20, hidden=16)]  # 387 parameters
    x, y = data(40, (20,))
    query_x, query_y = data(6, (20,), seed=1)
    exact_state, _, exact = fit_and_score(TracIn(), models, x, y, query_x, query_y)
    projected_state, _, projected = fit_and_score(TracIn(TracInSettings(k=300)), models, x, y, query_x, query_y)
    correlation = torch.corrcoef(torch.stack([exact.flatten(), projected.flatten()]))[0, 1]
    assert correlation > 0.95
    torch.testing.assert_close(projected_state["self_influence"], exact_state["self_influence"])


def test_tracin_needs_one_learning_rate_per_checkpoint():
    x, y = data(5, (6,))
    with pytest.raises(SettingsError, match="learning rates"):
        TracIn().fit(attribution_inputs([mlp(), mlp(seed=1)], x, y, lrs=[0.1]))


@pytest.mark.parametrize("projection", [None, 200])
def test_gradient_dot_uses_the_final_checkpoint_only(projection):
    models = [mlp(seed=0, d_in=20, hidden=16), mlp(seed=1, d_in=20, hidden=16)]
    x, y = data(11, (20,))
    query_x, query_y = data(3, (20,), seed=1)
    method = GradientDot(GradientSimilaritySettings(k=projection))
    state, inputs, scores = fit_and_score(method, models, x, y, query_x, query_y)
    expected = -direct_dot(models[-1], query_x, query_y, x, y)
    if projection is None:
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    else:
        assert torch.corrcoef(torch.stack([scores.flatten(), expected.flatten()]))[0, 1] > 0.95
    torch.testing.assert_close(method.self_influence(state, inputs), loop_gradients(models[-1], x, y, "loss").square().sum(1))


@pytest.mark.parametrize("make_model, shape", MODELS_AND_SHAPES)
def test_gradient_cosine_equals_the_normalised_gradient_dot(make_model, shape):
    models = [make_model(seed=0), make_model(seed=1)]
    x, y = data(9, shape)
    query_x, query_y = data(3, shape, seed=1)
    state, inputs, scores = fit_and_score(GradientCosine(), models, x, y, query_x, query_y)
    expected = (-F.normalize(loop_gradients(models[-1], query_x, query_y, "measurement"))
                @ F.normalize(loop_gradients(models[-1], x, y, "loss")).T)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(SettingsError, match="'gradcos' defines no self-influence"):
        GradientCosine().self_influence(state, inputs)


def test_a_training_example_queried_with_its_label_is_its_own_strongest_proponent():
    model = mlp(d_in=20, hidden=16)
    x, y = data(30, (20,))
    for method in [TracIn(), GradientDot(), GradientCosine(), RepresentationSimilarity()]:
        _, _, scores = fit_and_score(method, [model], x, y, x, y)
        assert (scores.diagonal() > 0).all(), method.name
        assert (scores.argmax(dim=1) == torch.arange(30)).float().mean() > 0.8, method.name


@pytest.mark.parametrize("make_model, shape", MODELS_AND_SHAPES)
def test_representation_similarity_is_the_cosine_of_the_last_linear_layers_inputs(make_model, shape):
    models = [make_model(seed=5), make_model(seed=0)]
    x, y = data(9, shape)
    query_x, query_y = data(3, shape, seed=1)
    final = models[-1]
    features = []
    last_linear = [module for module in final.modules() if isinstance(module, torch.nn.Linear)][-1]
    handle = last_linear.register_forward_hook(lambda _m, args, _o: features.append(args[0].flatten(1)))
    with torch.no_grad():
        final(query_x), final(x)
    handle.remove()
    _, _, scores = fit_and_score(RepresentationSimilarity(), models, x, y, query_x, query_y)
    torch.testing.assert_close(scores, F.normalize(features[0]) @ F.normalize(features[1]).T)


def test_representation_similarity_names_an_untracked_layer():
    x, y = data(4, (6,))
    method = RepresentationSimilarity(RepresentationSettings(layer="7"))
    with pytest.raises(SettingsError, match="'7'"):
        method.fit(attribution_inputs([mlp()], x, y))
