"""The fast and the memory-bounded featurization paths give the results of the plain ones (issue 29).

Linear layers' inputs are captured without their bias column of ones, and projected with the
bias row added (LinearInput.project): the features must equal those of the formed inputs
[a | 1] multiplied by the projection, as before, up to float32 rounding. TRAK preconditions its
features in place and scores chunk by chunk of training examples; with a scratch directory its
(N, k) features and (queries, N) scores are memory-mapped there instead of held in RAM.
"""
from __future__ import annotations

import pytest
import torch
from helpers_methods import attribution_inputs, closed_form_trak, cnn, data, mlp, token_model
from torch.utils._python_dispatch import TorchDispatchMode

from attribution_core.methods import trak
from attribution_core.methods.trak import Trak, TrakSettings
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


@pytest.mark.parametrize("use_q", [True, False])
def test_trak_fitted_and_scored_in_chunks_equals_the_closed_form(monkeypatch, use_q):
    monkeypatch.setattr(trak, "ROW_CHUNK", 7)  # 20 training examples: three chunks, the last one short
    models = [mlp(seed=0), mlp(seed=1)]
    x, y = data(20, (6,))
    query_x, query_y = data(4, (6,), seed=1)
    method, inputs = Trak(TrakSettings(projection="identity", damping_ratio=0.1, use_q=use_q)), attribution_inputs(models, x, y)
    state = method.fit(inputs)
    expected = closed_form_trak(models, x, y, query_x, query_y, damping_ratio=0.1, use_q=use_q)
    torch.testing.assert_close(method.score(state, inputs, query_x, query_y), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.self_influence(state, inputs), method.score(state, inputs, x, y).diagonal(), rtol=1e-4, atol=1e-6)


def fitted_and_scored(inputs, query_x, query_y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TRAK's state and scores at k = 32."""
    method = Trak(TrakSettings(k=32))
    state = method.fit(inputs)
    return state, method.score(state, inputs, query_x, query_y)


def test_a_scratch_directory_gives_the_same_state_and_scores_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trak, "ROW_CHUNK", 16)
    models = [mlp(seed=0), mlp(seed=1)]
    x, y = data(50, (6,))
    query_x, query_y = data(5, (6,), seed=1)
    inputs = attribution_inputs(models, x, y)
    in_memory = fitted_and_scored(inputs, query_x, query_y)
    inputs.scratch = tmp_path / "scratch"
    mapped = fitted_and_scored(inputs, query_x, query_y)
    assert in_memory[0].keys() == mapped[0].keys()
    for name, tensor in in_memory[0].items():
        assert torch.equal(tensor, mapped[0][name]), name
    assert torch.equal(in_memory[1], mapped[1])
    assert list((tmp_path / "scratch").iterdir()) == []  # the mapped files were unlinked at once


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation allocates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = [value for value in [*args, *(kwargs or {}).values()] if isinstance(value, torch.Tensor)]
        shared = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("scratch, holds_n_by_k", [(False, True), (True, False)])
def test_with_a_scratch_directory_trak_never_allocates_n_by_k_in_memory(tmp_path, monkeypatch, scratch, holds_n_by_k):
    monkeypatch.setattr(trak, "ROW_CHUNK", 64)
    x, y = data(1000, (6,))
    query_x, query_y = data(3, (6,), seed=1)
    inputs = attribution_inputs([mlp(seed=0)], x, y, batch_size=50)
    inputs.scratch = tmp_path if scratch else None
    with LargestAllocation() as mode:
        fitted_and_scored(inputs, query_x, query_y)
    assert (mode.largest >= 1000 * 32) == holds_n_by_k
