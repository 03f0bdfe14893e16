"""Per-example gradients from layer structure (numerics/gradients.py) equal autograd's, layer by layer."""
from __future__ import annotations

import pytest
import torch
from helpers_methods import cnn, data, loop_gradients, mlp, token_model
from torch import nn

from attribution_core.methods.exact import flat_gradients
from attribution_core.numerics.gradients import capture_layer_batches, per_example_gradients
from attribution_core.task import Task

TASK = Task()


def captured_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: str) -> torch.Tensor:
    function = TASK.train_loss if objective == "loss" else TASK.measurement
    return per_example_gradients(capture_layer_batches(model, TASK.tracked_modules(model), function, x, y))


def conv_model(bias: bool, **conv_options) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, bias=bias, **conv_options)
    with torch.no_grad():
        n_features = conv(torch.zeros(1, 2, 7, 7)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_features, 3)).eval()


@pytest.mark.parametrize("objective", ["loss", "measurement"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_gradients_match_autograd(bias, objective):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).eval()
    x, y = data(6, (5,))
    torch.testing.assert_close(captured_gradients(model, x, y, objective), loop_gradients(model, x, y, objective))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_on_sequences_sums_over_positions(bias):
    model = token_model(bias=bias)
    x, y = data(5, (7, 4))
    torch.testing.assert_close(captured_gradients(model, x, y, "loss"), loop_gradients(model, x, y, "loss"))


@pytest.mark.parametrize(
    "conv_options",
    [
        {"padding": 1},
        {"padding": 2, "stride": 2, "dilation": 2},
        {"padding": (1, 0), "stride": (2, 1)},
        {"padding": "same", "dilation": 2},
        {"padding": "valid"},
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_layer_gradients_match_autograd(conv_options, bias):
    model = conv_model(bias, **conv_options)
    x, y = data(4, (2, 7, 7))
    torch.testing.assert_close(captured_gradients(model, x, y, "loss"), loop_gradients(model, x, y, "loss"))


@pytest.mark.parametrize("objective", ["loss", "measurement"])
def test_small_cnn_gradients_match_autograd(objective):
    model = cnn()
    x, y = data(5, (2, 6, 6))
    torch.testing.assert_close(captured_gradients(model, x, y, objective), loop_gradients(model, x, y, objective))


@pytest.mark.parametrize("objective", ["loss", "measurement"])
def test_functional_reference_gradients_match_autograd(objective):
    """exact.flat_gradients (torch.func) is the reference other tests use: check it too."""
    for model, shape in [(cnn(), (2, 6, 6)), (token_model(bias=False), (3, 4)), (mlp(), (6,))]:
        x, y = data(4, shape)
        torch.testing.assert_close(flat_gradients(model, TASK, x, y, objective), loop_gradients(model, x, y, objective))


def test_capture_leaves_the_model_without_gradients():
    model = cnn()
    x, y = data(3, (2, 6, 6))
    captured_gradients(model, x, y, "loss")
    assert all(p.grad is None for p in model.parameters())


def test_in_place_activation_after_a_layer_does_not_change_its_gradients():
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 6 * 6, 4), nn.ReLU(inplace=True),
              nn.Linear(4, 3)]
    model = nn.Sequential(*layers).eval()
    x, y = data(4, (2, 6, 6))
    torch.testing.assert_close(captured_gradients(model, x, y, "loss"), loop_gradients(model, x, y, "loss"))
