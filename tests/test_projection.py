"""Random projections: structure, determinism, scaling, and never an (examples x parameters) tensor."""
from __future__ import annotations

import math

import pytest
import torch
from helpers_methods import cnn, data
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attribution_core.errors import SettingsError
from attribution_core.numerics.gradients import LayerBatch, capture_layer_batches, per_example_gradients
from attribution_core.numerics.inputs import batches
from attribution_core.numerics.projected_gradients import project_gradients
from attribution_core.numerics.projection import (
    DenseProjector,
    IdentityProjector,
    KroneckerProjector,
    kronecker_split,
    tracked_layer_shapes,
)
from attribution_core.task import Task

TASK = Task()


def cnn_layers() -> tuple[dict[str, tuple[int, int]], list[LayerBatch]]:
    """Layer shapes and captured layers of the small CNN (the conv layer has 36 positions)."""
    model = cnn()
    x, y = data(5, (2, 6, 6))
    return tracked_layer_shapes(model, TASK), capture_layer_batches(model, TASK.tracked_modules(model), TASK.train_loss, x, y)


def explicit_kronecker_matrix(projector: KroneckerProjector, name: str, like: torch.Tensor) -> torch.Tensor:
    """The layer's (d_out d_in, k_layer) projection matrix: P_out,j ⊗ P_in,j per block j, features ordered (i, i', j), / √k_layer."""
    p_out, p_in = projector.factors(name, like)
    split = projector.split[name]
    blocks = torch.stack([torch.kron(p_out[:, j :: split.blocks], p_in[:, j :: split.blocks]) for j in range(split.blocks)], dim=2)
    return blocks.flatten(1)[:, : split.k_layer] / math.sqrt(split.k_layer)


def basis_layers(shapes: dict[str, tuple[int, int]]) -> list[LayerBatch]:
    """One example per parameter whose gradient is that parameter's unit vector (T = 1)."""
    n_params = sum(d_out * d_in for d_out, d_in in shapes.values())
    layers, offset = [], 0
    for name, (d_out, d_in) in shapes.items():
        grads, inputs = torch.zeros(n_params, 1, d_out), torch.zeros(n_params, 1, d_in)
        for index in range(d_out * d_in):
            grads[offset + index, 0, index // d_in] = 1.0
            inputs[offset + index, 0, index % d_in] = 1.0
        layers.append(LayerBatch(name, inputs, grads))
        offset += d_out * d_in
    return layers


@pytest.mark.parametrize("block", [1, 4, 0])
def test_kronecker_projection_equals_the_explicit_kronecker_matrix(block):
    shapes, layers = cnn_layers()
    projector = KroneckerProjector(shapes, k=40, seed=3, block=block)
    gradients = per_example_gradients(layers)
    expected, offset = [], 0
    for name, (d_out, d_in) in shapes.items():
        expected.append(gradients[:, offset : offset + d_out * d_in] @ explicit_kronecker_matrix(projector, name, gradients))
        offset += d_out * d_in
    torch.testing.assert_close(projector.project(layers), torch.cat(expected, dim=1))


@pytest.mark.parametrize("block", [1, 4, 0])
def test_projecting_whole_gradient_matrices_equals_projecting_their_captured_layers(block):
    shapes, layers = cnn_layers()
    projector = KroneckerProjector(shapes, k=40, seed=5, block=block)
    matrices = {layer.name: layer.per_example_gradients() for layer in layers}
    torch.testing.assert_close(projector.project_matrices(matrices), projector.project(layers))


def test_rotated_projection_projects_the_rotated_gradients():
    shapes, layers = cnn_layers()
    generator = torch.Generator().manual_seed(0)
    rotations = {name: tuple(torch.linalg.qr(torch.randn(d, d, generator=generator))[0] for d in shape) for name, shape in shapes.items()}
    projector = KroneckerProjector(shapes, k=40, seed=5, block=4)
    rotated_gradients = {layer.name: rotations[layer.name][0].T @ layer.per_example_gradients() @ rotations[layer.name][1]
                         for layer in layers}
    torch.testing.assert_close(projector.rotated(rotations).project(layers), projector.project_matrices(rotated_gradients),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda s: KroneckerProjector(s, 30, seed=1), lambda s: DenseProjector(s, 30, seed=1, chunk=17)])
def test_projection_is_one_fixed_linear_map_of_the_flattened_gradient(make):
    shapes, layers = cnn_layers()
    projector = make(shapes)
    matrix = projector.project(basis_layers(shapes))  # (n_params, k): row r is Pᵀ e_r
    torch.testing.assert_close(projector.project(layers), per_example_gradients(layers) @ matrix)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("projector_class", [KroneckerProjector, DenseProjector])
def test_same_seed_gives_same_features_and_another_seed_other_features(projector_class, kind):
    shapes, layers = cnn_layers()
    first = projector_class(shapes, 25, seed=7, kind=kind).project(layers)
    again = projector_class(shapes, 25, seed=7, kind=kind).project(layers)
    other = projector_class(shapes, 25, seed=8, kind=kind).project(layers)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_dense_projection_does_not_depend_on_its_chunk():
    shapes, layers = cnn_layers()
    reference = DenseProjector(shapes, 20, seed=2, chunk=10**9).project(layers)
    for chunk in [1, 11, 64]:
        torch.testing.assert_close(DenseProjector(shapes, 20, seed=2, chunk=chunk).project(layers), reference)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("projector_class", [KroneckerProjector, DenseProjector])
def test_projection_preserves_squared_norms_on_average(projector_class, kind):
    shapes, layers = cnn_layers()
    gradients = per_example_gradients(layers)
    ratios = torch.stack(
        [projector_class(shapes, 64, seed=seed, kind=kind).project(layers).square().sum(1) / gradients.square().sum(1)
         for seed in range(60)]
    )
    assert ratios.mean().item() == pytest.approx(1.0, abs=0.08)


def test_identity_projection_is_the_per_example_gradient():
    shapes, layers = cnn_layers()
    projector = IdentityProjector(shapes)
    assert projector.k == sum(d_out * d_in for d_out, d_in in shapes.values())
    torch.testing.assert_close(projector.project(layers), per_example_gradients(layers))


@pytest.mark.parametrize("block", [1, 6, 0])
@pytest.mark.parametrize("k", [2, 3, 50, 137, 1000, 9610])
def test_kronecker_split_uses_exactly_k_features_within_each_layer(k, block):
    shapes = {"hidden": (128, 65), "output": (10, 129)}
    split = kronecker_split(shapes, k, block)
    assert sum(layer.k_layer for layer in split.values()) == k
    for name, layer in split.items():
        d_out, d_in = shapes[name]
        assert 1 <= layer.k_out <= d_out and 1 <= layer.k_in <= d_in
        assert layer.k_out * layer.k_in * layer.blocks >= layer.k_layer > layer.k_out * layer.k_in * (layer.blocks - 1)
        if block == 0:
            assert layer.blocks == 1
        if block == 1:
            assert layer.k_out == layer.k_in == 1
    if k >= 1000:  # large enough for the proportional split to show: 8320 vs 1290 parameters
        assert split["hidden"].k_layer == pytest.approx(k * 8320 / 9610, abs=1)


@pytest.mark.parametrize("k", [1, 9611])
def test_kronecker_split_rejects_k_outside_layers_to_parameters(k):
    with pytest.raises(SettingsError, match="k="):
        kronecker_split({"hidden": (128, 65), "output": (10, 129)}, k)


def test_features_follow_the_inputs_dtype():
    shapes, layers = cnn_layers()
    doubled = [LayerBatch(layer.name, layer.inputs.double(), layer.output_grads.double()) for layer in layers]
    for projector in [KroneckerProjector(shapes, 12), DenseProjector(shapes, 12)]:
        features = projector.project(doubled)
        assert features.dtype == torch.float64
        torch.testing.assert_close(features.float(), projector.project(layers))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_kronecker_featurization_never_forms_per_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x, y = data(2048, (784,), n_classes=10)
    shapes = tracked_layer_shapes(model, TASK)
    n_params, batch_size = sum(d_out * d_in for d_out, d_in in shapes.values()), 256
    projector = KroneckerProjector(shapes, 1024)
    with LargestTensor() as mode:
        features = project_gradients(model, TASK, projector, "loss", batches(x, y, batch_size, torch.device("cpu")), len(y))
    assert features.shape == (2048, 1024)
    smallest_layer_gradients = batch_size * min(d_out * d_in for d_out, d_in in shapes.values() if d_out > 10)
    assert mode.largest < smallest_layer_gradients < 2048 * n_params  # not even one chunk of one hidden layer
