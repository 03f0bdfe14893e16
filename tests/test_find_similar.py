"""Find-similar's representation index and the small score helpers the review pages read (attribution_core.inspection)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy.stats import rankdata

from attribution_core import inspection
from attribution_core.jobs.kinds import load_result, representations_job
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace


@pytest.fixture(scope="module")
def run(demo_workspace, tmp_path_factory):
    """fmnist-mlp on a private copy of the demo (these tests store a representation index)."""
    root = tmp_path_factory.mktemp("find_similar") / "workspace"
    shutil.copytree(demo_workspace.root, root)
    return load_run(Workspace(root), "fmnist-mlp")


def test_representation_index_is_unit_penultimate_representations_stored_once(run):
    assert inspection.stored_representation_index(run) is None
    assert load_result(run, representations_job(run, -1)) is None, "the job's load computes nothing"
    calls = []
    index = inspection.representation_index(run, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert index.checkpoint == len(run.checkpoints) - 1
    for split, stored in (("train", index.train), ("test", index.test)):
        raw = inspection.penultimate_representations(run, split=split)
        np.testing.assert_allclose(stored * np.linalg.norm(raw, axis=1, keepdims=True), raw, rtol=1e-4, atol=1e-5)
    again = load_result(run, representations_job(run, -1))
    np.testing.assert_array_equal(again.train, index.train)


def test_most_similar_ranks_training_examples_by_cosine_and_skips_the_example_itself(run):
    index = inspection.representation_index(run)
    raw = inspection.penultimate_representations(run, split="train")
    example = 7
    cosines = raw @ raw[example] / (np.linalg.norm(raw, axis=1) * np.linalg.norm(raw[example]))
    cosines[example] = -np.inf
    expected = np.argsort(-cosines, kind="stable")[:5]
    indices, values = inspection.most_similar(index, "train", example, 5)
    assert example not in indices
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(values, cosines[expected], rtol=1e-4)
    test_raw = inspection.penultimate_representations(run, split="test")[3]
    test_cosines = raw @ test_raw / (np.linalg.norm(raw, axis=1) * np.linalg.norm(test_raw))
    test_indices, _ = inspection.most_similar(index, "test", 3, 4)
    np.testing.assert_array_equal(test_indices, np.argsort(-test_cosines, kind="stable")[:4])


def test_top_scores_among_a_mask_and_ranks():
    values = np.array([0.5, -1.0, 2.0, 0.5, -3.0, 1.0])
    keep = np.array([True, True, False, True, True, True])
    indices, scores = inspection.top_scores(values, 2, keep=keep)
    assert list(indices) == [5, 0] and list(scores) == [1.0, 0.5]
    assert list(inspection.top_scores(values, 2, keep=keep, largest=False)[0]) == [4, 1]
    expected_ranks = rankdata(-values, method="min").astype(int)
    assert list(inspection.score_ranks(values, np.arange(6))) == list(expected_ranks)  # ties share the best rank


def test_predicted_removal_change_is_minus_the_sum_of_the_removed_scores():
    values = np.array([0.25, -0.5, 1.0, 2.0])
    assert inspection.predicted_removal_change(values, [0, 2]) == -(0.25 + 1.0)
