"""The fast featurization paths give the features of the plain ones (issue 29).

Linear layers' inputs are captured without their bias column of ones, and projected with the
bias row added (LinearInput.project): the features must equal those of the formed inputs
[a | 1] multiplied by the projection, as before, up to float32 rounding.
"""
from __future__ import annotations

import pytest
import torch
from helpers_methods import cnn, data, mlp, token_model

from attribution_core.numerics.gradients import LayerBatch, capture_layer_batches
from attribution_core.numerics.projection import KroneckerProjector, tracked_layer_shapes
from attribution_core.task import Task

TASK = Task()

MODELS = {
    "mlp": (lambda: mlp(d_in=6, hidden=5), (6,)),
    "tokens with bias": (lambda: token_model(bias=True), (7, 4)),
    "tokens without bias": (lambda: token_model(bias=False), (7, 4)),
    "cnn": (cnn, (2, 6, 6)),
}


def formed_copy(layer: LayerBatch) -> LayerBatch:
    """The same layer with its (B, T, d_in) inputs formed: a ones column appended for the bias, patches unfolded."""
    unformed = layer.unformed_input
    return LayerBatch(layer.name, unformed.formed() if unformed is not None else layer.inputs, layer.output_grads)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("block", [1, 4, 0])
def test_projecting_captured_inputs_equals_projecting_the_formed_inputs(name, block):
    build, shape = MODELS[name]
    model = build()
    x, y = data(9, shape)
    layers = capture_layer_batches(model, TASK.tracked_modules(model), TASK.measurement, x, y)
    formed = [formed_copy(layer) for layer in layers]
    projector = KroneckerProjector(tracked_layer_shapes(model, TASK), k=12, seed=1, block=block)
    torch.testing.assert_close(projector.project(layers), projector.project(formed))
    assert all(layer.unformed_input is not None for layer in layers)  # projecting formed nothing


def test_formed_linear_inputs_end_with_a_ones_column_only_with_a_bias():
    x, y = data(3, (7, 4))
    for bias, width in ((True, 5), (False, 4)):
        model = token_model(bias=bias)
        layers = capture_layer_batches(model, TASK.tracked_modules(model), TASK.train_loss, x, y)
        encoder = layers[0].inputs
        assert encoder.shape == (3, 7, width)
        torch.testing.assert_close(encoder[..., :4], x)
        if bias:
            assert bool((encoder[..., 4] == 1).all())
