"""Predictions, penultimate-layer representations and the 2-D map a run's model gives."""
from __future__ import annotations

import numpy as np
import pytest
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
        np.testing.assert_allclose(head(torch.as_tensor(representations)).numpy(), run.load_model(-1)(test_set.x).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_umap_layout_is_seeded():
    rows = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    first, second = inspection.umap_layout(rows), inspection.umap_layout(rows)
    assert first.shape == (60, 2)
    np.testing.assert_allclose(first, second)


@pytest.mark.filterwarnings("ignore:using precomputed metric")  # umap's note that such a model has no inverse_transform
def test_umap_on_the_pairwise_distances_builds_the_graph_umap_builds_from_the_rows():
    import umap
    from scipy.spatial.distance import cdist

    rows = np.random.default_rng(2).normal(size=(300, 6)).astype(np.float32)
    distances = inspection.pairwise_euclidean(rows)
    np.testing.assert_allclose(distances, cdist(rows.astype(np.float64), rows.astype(np.float64)), atol=1e-9)
    assert (np.diag(distances) == 0).all()
    settings = dict(n_neighbors=15, random_state=0, n_jobs=1)
    from_rows = umap.UMAP(**settings).fit(rows).graph_.toarray()
    from_distances = umap.UMAP(metric="precomputed", **settings).fit(distances).graph_.toarray()
    np.testing.assert_allclose(from_distances, from_rows, atol=1e-5)


def test_a_large_map_lays_out_landmarks_by_umap_and_places_every_other_row_among_its_nearest():
    generator = np.random.default_rng(1)
    centres = generator.normal(scale=10, size=(3, 5))
    rows = np.concatenate([centre + generator.normal(size=(100, 5)) for centre in centres]).astype(np.float32)
    positions = inspection.landmark_layout(rows, landmarks=60, neighbours=4)
    chosen = np.sort(np.random.default_rng(0).choice(300, size=60, replace=False))
    np.testing.assert_allclose(positions[chosen], inspection.umap_layout(rows[chosen]), rtol=1e-5)  # the landmarks: UMAP's
    other = np.setdiff1d(np.arange(300), chosen)[0]
    distances = np.linalg.norm(rows[chosen] - rows[other], axis=1)
    nearest = np.argsort(distances)[:4]
    weights = 1 / (distances[nearest] + 1e-6)
    expected = (weights[:, None] * positions[chosen][nearest]).sum(0) / weights.sum()
    np.testing.assert_allclose(positions[other], expected, rtol=1e-4, atol=1e-4)
    cluster = np.repeat(np.arange(3), 100)  # every row lands among its own cluster's landmarks
    centroids = np.stack([positions[chosen][cluster[chosen] == c].mean(0) for c in range(3)])
    assert (np.linalg.norm(positions[:, None] - centroids[None], axis=2).argmin(1) == cluster).mean() > 0.95


def test_a_box_holds_the_points_between_its_corners_given_in_either_order():
    positions = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5], [0.5, -0.1]])
    assert inspection.inside_box(positions, (1.5, -0.5), (1.0, 0.0)).tolist() == [True, True, False, False]


def test_a_lasso_holds_the_points_inside_its_polygon_also_where_it_is_concave():
    """An L-shaped lasso: the union of the squares [0, 2] x [0, 1] and [0, 1] x [1, 2], checked point by point on a grid."""
    grid = np.stack(np.meshgrid(np.linspace(-0.45, 2.45, 30), np.linspace(-0.45, 2.45, 30)), axis=-1).reshape(-1, 2)
    x, y = [0, 2, 2, 1, 1, 0], [0, 0, 1, 1, 2, 2]
    in_lower = (grid[:, 0] > 0) & (grid[:, 0] < 2) & (grid[:, 1] > 0) & (grid[:, 1] < 1)
    in_upper = (grid[:, 0] > 0) & (grid[:, 0] < 1) & (grid[:, 1] > 0) & (grid[:, 1] < 2)
    assert (inspection.inside_polygon(grid, x, y) == (in_lower | in_upper)).all()
    assert not inspection.inside_polygon(grid, [0, 1], [0, 1]).any(), "two points enclose nothing"
