"""Predictions, penultimate-layer representations and the 2-D map a run's model gives."""
from __future__ import annotations

import numpy as np
import torch

from attribution_core import inspection
from attribution_core.runs.run import load_run


def test_predictions_are_the_final_models_softmax(demo_workspace):
    run = load_run(demo_workspace, "fmnist-mlp")
    _, test_set = run.datasets()
    probabilities = inspection.predict(run, split="test")
    with torch.no_grad():
        expected = torch.softmax(run.load_model(-1)(test_set.x), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(inspection.predict(run, test_set.x[:3]), expected[:3], rtol=1e-5, atol=1e-7)


def test_penultimate_representations_feed_the_classifier_head(demo_workspace):
    run = load_run(demo_workspace, "fmnist-mlp")
    representations = inspection.penultimate_representations(run, split="test")
    head = run.load_model(-1)[-1]
    _, test_set = run.datasets()
    with torch.no_grad():
        np.testing.assert_allclose(head(torch.as_tensor(representations)).numpy(), run.load_model(-1)(test_set.x).numpy(), rtol=1e-4, atol=1e-5)


def test_umap_layout_is_seeded():
    rows = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    first, second = inspection.umap_layout(rows), inspection.umap_layout(rows)
    assert first.shape == (60, 2)
    np.testing.assert_allclose(first, second)
