"""TRAK against its closed form, and the invariants every TRAK score must keep."""
from __future__ import annotations

import pytest
import torch
from helpers_methods import attribution_inputs, closed_form_trak, cnn, data, mlp

from attribution_core.errors import SettingsError
from attribution_core.methods.trak import Trak, TrakSettings


@pytest.mark.parametrize("use_q", [True, False])
@pytest.mark.parametrize("make_model, shape", [(mlp, (6,)), (cnn, (2, 6, 6))])
def test_identity_projection_equals_the_closed_form(make_model, shape, use_q):
    models = [make_model(seed=0), make_model(seed=1)]
    x, y = data(20, shape)
    query_x, query_y = data(4, shape, seed=1)
    settings = TrakSettings(projection="identity", damping_ratio=0.1, use_q=use_q)
    method, inputs = Trak(settings), attribution_inputs(models, x, y)
    scores = method.score(method.fit(inputs), inputs, query_x, query_y)
    expected = closed_form_trak(models, x, y, query_x, query_y, damping_ratio=0.1, use_q=use_q)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projection", ["kronecker", "dense", "identity"])
def test_self_influence_is_the_diagonal_of_pairwise_scores(projection):
    models = [cnn(seed=0), cnn(seed=1)]
    x, y = data(15, (2, 6, 6))
    method, inputs = Trak(TrakSettings(k=32, projection=projection)), attribution_inputs(models, x, y)
    state = method.fit(inputs)
    torch.testing.assert_close(method.self_influence(state, inputs), method.score(state, inputs, x, y).diagonal(), rtol=1e-4, atol=1e-6)


def test_scores_do_not_depend_on_batch_size():
    models = [mlp(seed=0), mlp(seed=1)]
    x, y = data(23, (6,))
    query_x, query_y = data(5, (6,), seed=1)
    method = Trak(TrakSettings(k=24))
    results = []
    for batch_size in [1, 4, 100]:
        inputs = attribution_inputs(models, x, y, batch_size=batch_size)
        results.append(method.score(method.fit(inputs), inputs, query_x, query_y))
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-4, atol=1e-6)


def test_scores_are_float32_on_the_cpu_with_one_row_per_query():
    x, y = data(12, (6,))
    method, inputs = Trak(TrakSettings(k=16)), attribution_inputs([mlp()], x, y)
    scores = method.score(method.fit(inputs), inputs, x[:3], y[:3])
    assert scores.shape == (3, 12) and scores.dtype == torch.float32 and scores.device.type == "cpu"


def test_progress_counts_every_chunk_of_every_checkpoint():
    calls = []
    x, y = data(10, (6,))
    inputs = attribution_inputs([mlp(seed=0), mlp(seed=1)], x, y, batch_size=4, progress=lambda done, total: calls.append((done, total)))
    Trak(TrakSettings(k=16)).fit(inputs)
    assert calls == [(done, 6) for done in range(1, 7)]


@pytest.mark.parametrize(
    "field, value",
    [("k", 0), ("projection", "sparse"), ("projection_kind", "uniform"), ("damping_ratio", -1.0), ("kronecker_block", -1),
     ("dense_chunk", 0)],
)
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(SettingsError, match=f"{field}="):
        TrakSettings(**{field: value})


def test_a_state_fitted_with_another_k_is_refused():
    x, y = data(12, (6,))
    inputs = attribution_inputs([mlp()], x, y)
    state = Trak(TrakSettings(k=16)).fit(inputs)
    with pytest.raises(SettingsError, match="k=20"):
        Trak(TrakSettings(k=20)).score(state, inputs, x, y)
