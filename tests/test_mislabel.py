"""Mislabel rankings: hand-checked metrics, out-of-sample cleanlab, checkpoint choice, the record's dynamics, storage and reuse."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attribution_core.api import attribute
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError
from attribution_core.evaluation import dynamics, mislabel
from attribution_core.evaluation.mislabel import (
    DYNAMICS_RANKINGS,
    RANKINGS,
    MislabelRanking,
    default_ranking,
    fold_masks,
    mislabel_metrics,
    rank_mislabels,
    ranking_label,
    rankings_for,
)
from attribution_core.models import ModelSpec
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import Workspace

pytestmark = pytest.mark.usefixtures("single_threaded")
NOISY_DIGITS = DataSpec(source="digits", test_size=360, split_seed=0, max_train=300, max_test=20, noise_fraction=0.1, noise_seed=0)
RECIPE = Recipe((Stage(epochs=6, lr=0.05, batch_size=32),), seed=0, checkpoints=CheckpointPolicy(every_epochs=2))


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    return train(NOISY_DIGITS, ModelSpec("mlp", {"hidden": [32]}), RECIPE, Workspace(tmp_path_factory.mktemp("noisy")), "noisy")


def test_metrics_of_a_hand_made_ranking():
    # 20 examples, 4 flipped; ranked by score: flipped at ranks 1, 3, 4 and 12 (1-based).
    scores = np.linspace(1.0, 0.0, 20)
    flipped = np.zeros(20, dtype=bool)
    flipped[[0, 2, 3, 11]] = True
    metrics = mislabel_metrics(scores, flipped)
    assert metrics["top10"] == pytest.approx(1 / 4)  # top 2: ranks 1, 2
    assert metrics["top20"] == pytest.approx(3 / 4)  # top 4: ranks 1..4
    # AUC: for each flipped example, the share of the 16 clean ones it outranks: 16, 15, 15, 8.
    assert metrics["auc"] == pytest.approx((16 + 15 + 15 + 8) / 64)
    assert mislabel_metrics(-scores, flipped)["auc"] == pytest.approx(1 - (16 + 15 + 15 + 8) / 64)


def test_fold_masks_partition_the_training_set():
    labels = np.repeat(np.arange(4), 10)
    masks = fold_masks(labels, 5, seed=0)
    assert len(masks) == 5 and np.array_equal(np.sum(masks, axis=0), np.ones(40))
    assert all(np.bincount(labels[mask], minlength=4).tolist() == [2, 2, 2, 2] for mask in masks)


class MembershipModel(torch.nn.Module):
    """A stand-in model that puts all probability on class 0 for the inputs it was trained on, else class 1."""

    def __init__(self, train_x: torch.Tensor, keep_mask: np.ndarray):
        super().__init__()
        self.trained = {row.numpy().tobytes() for row in train_x[torch.as_tensor(keep_mask)]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = torch.tensor([row.numpy().tobytes() in self.trained for row in x])
        logits = torch.zeros(len(x), 10)
        logits[:, 0], logits[:, 1] = seen.float() * 50, (~seen).float() * 50
        return logits


def test_cleanlab_gets_only_out_of_sample_probabilities(noisy_run, monkeypatch, tmp_path):
    shutil.copytree(noisy_run.workspace.root, tmp_path / "ws")  # keep the stand-in's ranking out of the shared workspace
    noisy_run = load_run(tmp_path / "ws", "noisy")
    train_set, _ = noisy_run.datasets()
    assert len({row.numpy().tobytes() for row in train_set.x}) == len(train_set)  # membership is identifiable
    keep_masks, received = [], {}

    def fake_retrain(run, keep_mask, *, task):
        keep_masks.append(keep_mask.copy())
        return MembershipModel(train_set.x, keep_mask)

    def spy(labels, pred_probs, **options):
        received.update(labels=labels, pred_probs=pred_probs, options=options)
        return pred_probs[np.arange(len(labels)), labels]

    monkeypatch.setattr(mislabel, "retrain", fake_retrain)
    monkeypatch.setattr(mislabel, "label_quality_scores", spy)
    ranking = rank_mislabels(noisy_run, "cleanlab", folds=3)
    assert len(keep_masks) == 3 and np.array_equal(np.sum([~mask for mask in keep_masks], axis=0), np.ones(len(train_set)))
    assert np.allclose(received["pred_probs"][:, 1], 1.0), "an example was scored by a model trained on it"
    assert np.array_equal(received["labels"], train_set.y.numpy())
    assert np.array_equal(ranking.suggested_labels, np.ones(len(train_set)))


def test_cleanlab_finds_flipped_labels_far_better_than_chance(noisy_run):
    train_set, _ = noisy_run.datasets()
    metrics = mislabel_metrics(rank_mislabels(noisy_run, "cleanlab").scores, train_set.flipped)
    assert metrics["auc"] > 0.8 and metrics["top20"] > 0.5


def test_loss_rankings_are_the_cross_entropy_at_the_chosen_checkpoints(noisy_run):
    train_set, _ = noisy_run.datasets()
    with torch.no_grad():
        logits = [noisy_run.load_model(index)(train_set.x) for index in range(3)]
    losses = [F.cross_entropy(item, train_set.y, reduction="none").numpy() for item in logits]
    last = rank_mislabels(noisy_run, "loss")
    assert last.checkpoints == [2] and np.allclose(last.scores, losses[2], atol=1e-5)
    assert np.array_equal(last.suggested_labels, logits[2].argmax(1).numpy())
    average = rank_mislabels(noisy_run, "loss_avg")
    assert average.checkpoints == [0, 1, 2] and np.allclose(average.scores, np.mean(losses, axis=0), atol=1e-5)
    restricted = rank_mislabels(noisy_run, "loss_avg", checkpoints=[0, -1])
    assert restricted.checkpoints == [0, 2] and np.allclose(restricted.scores, (losses[0] + losses[2]) / 2, atol=1e-5)
    probabilities = (torch.softmax(logits[0], 1) + torch.softmax(logits[2], 1)) / 2
    assert np.array_equal(restricted.suggested_labels, probabilities.argmax(1).numpy())
    assert np.array_equal(last.order()[:3], np.argsort(-losses[2], kind="stable")[:3])


def test_self_influence_ranking_is_the_methods_self_influence(noisy_run):
    ranking = rank_mislabels(noisy_run, "self_influence:trak", checkpoints=[-1])
    expected = attribute(noisy_run, "trak", queries=[0], checkpoints=[2]).self_influence  # stored by the ranking
    assert ranking.checkpoints == [2] and np.allclose(ranking.scores, expected)


def test_rankings_are_stored_and_reused(noisy_run, monkeypatch):
    first = rank_mislabels(noisy_run, "margin_avg")
    assert (noisy_run.directory / "mislabels").is_dir()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a stored ranking was recomputed")

    monkeypatch.setattr(mislabel, "_compute", must_not_run)
    again = rank_mislabels(noisy_run, "margin_avg")
    assert np.array_equal(again.scores, first.scores) and again.seconds == pytest.approx(first.seconds)
    with pytest.raises(AssertionError, match="recomputed"):
        rank_mislabels(noisy_run, "margin_avg", checkpoints=[0])  # other checkpoints: another key


@pytest.mark.badinput
def test_unknown_ranking_lists_the_known_ones(noisy_run):
    with pytest.raises(SettingsError, match="cleanlab"):
        rank_mislabels(noisy_run, "vibes")
    assert set(RANKINGS) >= {"self_influence:trak", "self_influence:ekfac", "self_influence:tracin", "loss", "loss_avg", "cleanlab"}


def test_every_ranking_has_its_own_label_for_people():
    labels = [ranking_label(name) for name in RANKINGS]
    assert len(set(labels)) == len(labels) and all(label and label != name for label, name in zip(labels, RANKINGS))
    assert ranking_label("self_influence:trak") == "Self-influence (TRAK)"
    assert ranking_label("early_aum") == dynamics.SIGNALS["early_aum"].label
    with pytest.raises(SettingsError, match="loss_avg"):
        ranking_label("self_influence:vibes")


def test_a_suggestion_is_a_class_other_than_the_given_label():
    ranking = MislabelRanking("any", np.zeros(3), np.array([1, 2, 0]), [], 0.0)
    assert [ranking.suggestion(index, label) for index, label in enumerate([1, 0, 0])] == [None, 2, None]
    assert MislabelRanking("any", np.zeros(1), None, [], 0.0).suggestion(0, 3) is None


def test_dynamics_rankings_are_the_records_signals_and_suggest_the_earliest_checkpoints_prediction(noisy_run, monkeypatch):
    train_set, _ = noisy_run.datasets()
    n = len(train_set)
    combined = rank_mislabels(noisy_run, "dynamics")
    np.testing.assert_array_equal(combined.scores, dynamics.combined(noisy_run.record, n))
    with torch.no_grad():
        earliest = noisy_run.load_model(0)(train_set.x).argmax(1).numpy()
    assert combined.checkpoints == [] and np.array_equal(combined.suggested_labels, earliest)
    for name in dynamics.SIGNALS:
        np.testing.assert_array_equal(rank_mislabels(noisy_run, name).scores, dynamics.signal_scores(noisy_run.record, n, name))
    assert default_ranking(noisy_run) == ("dynamics", None) and set(DYNAMICS_RANKINGS) <= set(rankings_for(noisy_run))
    metrics = mislabel_metrics(combined.scores, train_set.flipped)
    assert metrics["auc"] > 0.8 and metrics["top20"] > 0.5

    def must_not_run(*args, **kwargs):
        raise AssertionError("a stored ranking was recomputed")

    monkeypatch.setattr(mislabel, "_compute", must_not_run)
    np.testing.assert_array_equal(rank_mislabels(noisy_run, "dynamics").scores, combined.scores)


def test_dynamics_rankings_are_deterministic_across_workspaces(noisy_run, tmp_path):
    shutil.copytree(noisy_run.workspace.root, tmp_path / "ws", ignore=shutil.ignore_patterns("mislabels"))
    again = load_run(tmp_path / "ws", "noisy")
    assert not (again.directory / "mislabels").exists()
    for name in DYNAMICS_RANKINGS:
        np.testing.assert_array_equal(rank_mislabels(again, name).scores, rank_mislabels(noisy_run, name).scores)


@pytest.mark.badinput
def test_a_run_without_a_record_falls_back_to_checkpoints_and_says_what_is_missing(noisy_run):
    old = dataclasses.replace(noisy_run, record=None)  # as a run trained before records existed
    ranking, reason = default_ranking(old)
    assert ranking == "loss_avg" and "no training record" in reason and "loss_avg" in reason
    assert not set(DYNAMICS_RANKINGS) & set(rankings_for(old)) and "loss_avg" in rankings_for(old)
    with pytest.raises(SettingsError, match="no training record .*record/"):
        rank_mislabels(old, "dynamics")
    silent = dataclasses.replace(noisy_run.record, losses=np.full_like(noisy_run.record.losses, np.nan))
    with pytest.raises(SettingsError, match="no per-example losses"):
        rank_mislabels(dataclasses.replace(noisy_run, record=silent), "early_loss")


def test_a_run_tdx_cannot_train_again_is_offered_no_cross_validated_ranking(noisy_run):
    assert "cleanlab" in rankings_for(noisy_run)
    recorded = dataclasses.replace(noisy_run, metrics=noisy_run.metrics | {"origin": "recorded"}, trained_by=None)  # a plain loop's
    assert "cleanlab" not in rankings_for(recorded) and "dynamics" in rankings_for(recorded)
