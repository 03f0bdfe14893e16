"""Mislabel detection: rank training examples by how suspicious their label is.

Rankings: from the training record's dynamics (dynamics.py: early-training loss, AUM,
forgetting, learning time, data-map confidence and variability, cleanlab's self-confidence on early-training
probabilities, and "dynamics", their chosen combination), self-influence of an attribution
method (an example that only its own gradient explains), the training loss at chosen checkpoints
(or averaged over them), and confident learning (cleanlab) on out-of-sample probabilities from
k-fold cross-validated retraining. Each ranking is stored under runs/<id>/mislabels/<key>/ and
reused. With labels flipped on purpose, `mislabel_metrics` says how many flips each ranking finds.
RANKINGS says what each ranking measures, RANKING_LABELS (ranking_label) what to call it on a page.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..api import self_influence
from ..errors import SettingsError
from ..inspection import model_probabilities
from ..methods import METHODS
from ..numerics.inputs import batches
from ..progress import ProgressFn, no_progress
from ..runs.run import Run
from ..runs.threads import one_thread
from ..runs.training import retrain
from ..store import Artifact, atomic_save_npy, load_npy
from ..task import Task
from .dynamics import COMBINED, SIGNALS, combined, has_dynamics, signal_scores
from .dynamics import settings as dynamics_settings

DYNAMICS_RANKINGS: dict[str, str] = {
    "dynamics": "rank average of " + " and ".join(SIGNALS[name].label[0].lower() + SIGNALS[name].label[1:] for name in COMBINED)
                + ": what the training record says before the model memorises (default)",
    **{name: signal.description for name, signal in SIGNALS.items()},
}
"""The rankings read from the training record alone (no model is run): name -> what it measures."""

FALLBACK_RANKING = "loss_avg"
"""The ranking of a run without training dynamics: the loss averaged over its checkpoints."""

RANKINGS: dict[str, str] = {
    **DYNAMICS_RANKINGS,
    **{f"self_influence:{name}": f"self-influence τ(z, z) of {method.label}: examples only their own gradient explains"
       for name, method in METHODS.items() if method.has_self_influence},
    "loss": "training loss at the chosen checkpoints (default: the last)",
    "loss_avg": "training loss averaged over the chosen checkpoints (default: all; AUM-style)",
    "margin_avg": "minus the correct-class margin averaged over the chosen checkpoints (default: all)",
    "cleanlab": "confident learning (cleanlab self-confidence) on k-fold cross-validated probabilities",
}
"""Every mislabel ranking by name, with what it measures."""

RANKING_LABELS: dict[str, str] = {
    "dynamics": "Training dynamics (early loss and margin)",
    **{name: signal.label for name, signal in SIGNALS.items()},
    # a method label's own parenthesis ("exact influence (small models)") would nest in this one
    **{f"self_influence:{name}": f"Self-influence ({method.label.split(' (')[0]})"
       for name, method in METHODS.items() if method.has_self_influence},
    "loss": "Loss at chosen checkpoints",
    "loss_avg": "Mean loss over checkpoints",
    "margin_avg": "Mean margin over checkpoints",
    "cleanlab": "Confident learning (cleanlab, cross-validated)",
}
"""Every mislabel ranking's name for people (RANKINGS says what it measures)."""


def ranking_label(name: str) -> str:
    """A ranking's name for people: "Self-influence (TRAK)" for "self_influence:trak"."""
    if name not in RANKING_LABELS:
        raise SettingsError(f"unknown ranking {name!r}; choose one of {', '.join(RANKINGS)}")
    return RANKING_LABELS[name]


def rankings_for(run: Run) -> dict[str, str]:
    """The rankings a run supports: name -> description.

    RANKINGS less the self-influence of methods that cannot attribute the run, and less the
    dynamics rankings where the run has no record of per-example losses (missing_dynamics).
    """
    dynamic = missing_dynamics(run) is None
    return {name: text for name, text in RANKINGS.items()
            if (dynamic or name not in DYNAMICS_RANKINGS)
            and ((method := _self_influence_method(name)) is None or METHODS[method].unsupported_reason(run) is None)}


def missing_dynamics(run: Run) -> str | None:
    """Why the run's training dynamics cannot be ranked (what is missing), or None when they can."""
    if run.record is None:
        return (f"run {run.run_id!r} has no training record (runs/{run.run_id}/record/): it was trained before records "
                "existed, so nothing says how each example's loss went through training; train it again to record one")
    if not has_dynamics(run.record):
        return (f"run {run.run_id!r}'s training record holds no per-example losses (they are NaN): it records batches but "
                "not how each example's loss went; train it again to record them")
    return None


def default_ranking(run: Run) -> tuple[str, str | None]:
    """(the ranking to open with, why it is not "dynamics" or None): "dynamics" when the run has a record, else FALLBACK_RANKING."""
    reason = missing_dynamics(run)
    if reason is None:
        return "dynamics", None
    return FALLBACK_RANKING, f"{reason}. Ranking by {FALLBACK_RANKING} ({RANKINGS[FALLBACK_RANKING]}) instead."


@dataclass
class MislabelRanking:
    """A suspicion score per training example.

    scores: (N,) higher = more likely mislabelled.
    suggested_labels: (N,) the class the evidence points to, None where a ranking gives none. The
    dynamics rankings suggest the earliest checkpoint's prediction (the record holds no other class's
    probability, and by the last checkpoint a large model predicts the wrong label it memorised).
    checkpoints: the checkpoints the ranking used (empty for cleanlab, which retrains, and for the dynamics rankings).
    seconds: time the computation took (when it was computed, even if loaded now).
    """

    name: str
    scores: np.ndarray
    suggested_labels: np.ndarray | None
    checkpoints: list[int]
    seconds: float

    def order(self) -> np.ndarray:
        """(N,) training indices, most suspicious first."""
        return np.argsort(-self.scores, kind="stable")

    def suggestion(self, index: int, label: int) -> int | None:
        """The class suggested for training example `index` (given `label`); None where the ranking gives none or keeps it."""
        if self.suggested_labels is None or int(self.suggested_labels[index]) == int(label):
            return None
        return int(self.suggested_labels[index])


def _self_influence_method(ranking: str) -> str | None:
    return ranking.split(":", 1)[1] if ranking.startswith("self_influence:") else None


def ranking_checkpoints(run: Run, ranking: str, checkpoints: list[int] | None) -> list[int]:
    """The checkpoints a ranking uses: the caller's (sorted, negatives from the end) or its default."""
    n = len(run.checkpoints)
    if ranking == "cleanlab" or ranking in DYNAMICS_RANKINGS:
        return []
    method = _self_influence_method(ranking)
    default = METHODS[method].default_checkpoints(n) if method else ([n - 1] if ranking == "loss" else list(range(n)))
    return run.resolve_checkpoints(checkpoints, default)


@torch.no_grad()
def checkpoint_outputs(run: Run, checkpoints: list[int], task: Task, *, batch_size: int = 1024,
                       progress: ProgressFn = no_progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chosen checkpoint, on the training set: the task's losses (C, N), measurements (C, N) and probabilities (C, N, K)."""
    train_set, _ = run.datasets()
    losses, margins, probabilities = [], [], []
    for done, index in enumerate(checkpoints, start=1):
        model = run.load_model(index)
        chunks = list(batches(train_set.x, train_set.y, batch_size, torch.device("cpu")))
        losses.append(torch.cat([task.train_loss(model, x, y) for _, x, y in chunks]).numpy())
        margins.append(torch.cat([task.measurement(model, x, y) for _, x, y in chunks]).numpy())
        probabilities.append(model_probabilities(model, task, train_set.x, batch_size=batch_size))
        progress(done, len(checkpoints))
    return np.stack(losses), np.stack(margins), np.stack(probabilities)


def fold_masks(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out masks of a stratified k-fold split: folds arrays of (N,) bool, a partition."""
    from sklearn.model_selection import StratifiedKFold  # imported on use: sklearn and cleanlab take seconds to load

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    masks = []
    for _, held_out in splitter.split(np.zeros(len(labels)), labels):
        mask = np.zeros(len(labels), dtype=bool)
        mask[held_out] = True
        masks.append(mask)
    return masks


def cross_validated_probabilities(run: Run, task: Task, *, folds: int, progress: ProgressFn = no_progress) -> np.ndarray:
    """(N, K) out-of-sample probabilities: row i from a model retrained (the run's training function) without example i's fold."""
    train_set, _ = run.datasets()
    labels = train_set.y.numpy()
    probabilities = np.zeros((len(train_set), train_set.n_classes), dtype=np.float64)
    for done, held_out in enumerate(fold_masks(labels, folds, run.recipe.seed), start=1):
        with one_thread():  # see threads.one_thread: small models retrain faster on one thread
            model = retrain(run, ~held_out, task=task)
        probabilities[held_out] = model_probabilities(model, task, train_set.x[torch.as_tensor(held_out)])
        progress(done, folds)
    return probabilities


def label_quality_scores(labels: np.ndarray, probabilities: np.ndarray, **options) -> np.ndarray:
    """cleanlab's label quality (N,) of labels (N,) given out-of-sample probabilities (N, K); low = suspicious."""
    from cleanlab.rank import get_label_quality_scores  # imported on use, as sklearn above

    return get_label_quality_scores(labels, probabilities, **options)


def _compute(run: Run, ranking: str, checkpoints: list[int], task: Task, folds: int,
             progress: ProgressFn) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores (N,), suggested labels (N,) or None) of one ranking."""
    train_set, _ = run.datasets()
    if ranking in DYNAMICS_RANKINGS:
        scores = (combined(run.record, len(train_set)) if ranking == "dynamics"
                  else signal_scores(run.record, len(train_set), ranking))
        earliest = model_probabilities(run.load_model(0), task, train_set.x)  # one pass: only the probabilities are needed
        progress(1, 1)
        return scores, earliest.argmax(1)
    if ranking == "cleanlab":
        probabilities = cross_validated_probabilities(run, task, folds=folds, progress=progress)
        quality = label_quality_scores(train_set.y.numpy(), probabilities, method="self_confidence")
        return 1.0 - quality, probabilities.argmax(1)
    method = _self_influence_method(ranking)
    losses, margins, probabilities = checkpoint_outputs(run, checkpoints, task, progress=progress if method is None else no_progress)
    suggested = probabilities.mean(0).argmax(1)
    if method is not None:
        return np.asarray(self_influence(run, method, checkpoints=checkpoints, progress=progress, task=task), dtype=np.float64), suggested
    if ranking == "margin_avg":
        return -margins.mean(0).astype(np.float64), suggested
    return losses.mean(0).astype(np.float64), suggested


def rank_mislabels(
    run: Run,
    ranking: str,
    *,
    checkpoints: list[int] | None = None,
    task: Task | None = None,
    progress: ProgressFn = no_progress,
    folds: int = 5,
) -> MislabelRanking:
    """A run's training set ranked by one of RANKINGS (under the task's loss and measurement), computed once and then loaded."""
    if ranking not in RANKINGS:
        raise SettingsError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    if folds < 2:
        raise SettingsError(f"folds={folds}: cross-validation needs at least 2 folds")
    if ranking in DYNAMICS_RANKINGS and (missing := missing_dynamics(run)) is not None:
        raise SettingsError(f"ranking {ranking!r} reads the training record, but {missing}; "
                            f"or rank by the checkpoints instead ({FALLBACK_RANKING}, cleanlab, self-influence)")
    checkpoints, task = ranking_checkpoints(run, ranking, checkpoints), task or Task()
    artifact = _ranking_artifact(run, ranking, checkpoints, task, folds)

    def compute(stored: Artifact) -> dict[str, float]:
        started = time.perf_counter()
        scores, suggested = _compute(run, ranking, checkpoints, task, folds, progress)
        atomic_save_npy(stored.path("scores.npy"), scores)
        if suggested is not None:
            atomic_save_npy(stored.path("suggested.npy"), suggested.astype(np.int64))
        return {"seconds": time.perf_counter() - started}

    return _load_ranking(ranking, artifact.compute_once(compute), checkpoints)


def stored_ranking(run: Run, ranking: str, *, checkpoints: list[int] | None = None, task: Task | None = None,
                   folds: int = 5) -> MislabelRanking | None:
    """The ranking `rank_mislabels` would return when it is stored already, else None (nothing is computed)."""
    checkpoints = ranking_checkpoints(run, ranking, checkpoints)
    artifact = _ranking_artifact(run, ranking, checkpoints, task or Task(), folds)
    return _load_ranking(ranking, artifact, checkpoints) if artifact.is_complete() else None


def _ranking_artifact(run: Run, ranking: str, checkpoints: list[int], task: Task, folds: int) -> Artifact:
    # the dynamics rankings' settings are in their key, so that a change to them is not answered by a stale ranking
    dynamic = {"dynamics": dynamics_settings(), "suggested": "earliest checkpoint"} if ranking in DYNAMICS_RANKINGS else {}
    return run.artifact("mislabels", ranking=ranking, checkpoints=checkpoints, folds=folds if ranking == "cleanlab" else None,
                        task=task.key(), **dynamic)


def _load_ranking(ranking: str, artifact: Artifact, checkpoints: list[int]) -> MislabelRanking:
    suggested = artifact.path("suggested.npy")
    return MislabelRanking(ranking, load_npy(artifact.path("scores.npy")), load_npy(suggested) if suggested.exists() else None,
                           checkpoints, float(artifact.manifest()["seconds"]))


def mislabel_metrics(scores: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Recall of flipped labels in the top 10 % / 20 % of a ranking, and its ROC-AUC.

    scores: (N,) higher = more suspicious; flipped: (N,) bool, the labels flipped on purpose.
    The top x % holds round(x * N) examples (ties broken by index).
    """
    scores, flipped = np.asarray(scores, dtype=np.float64), np.asarray(flipped, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    n_flipped = int(flipped.sum())

    def recall(fraction: float) -> float:
        return float(flipped[order[: round(fraction * len(scores))]].sum() / n_flipped) if n_flipped else float("nan")

    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(flipped, scores)) if 0 < n_flipped < len(scores) else float("nan")
    return {"top10": recall(0.10), "top20": recall(0.20), "auc": auc}


def recall_curve(order: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected, fraction of flipped labels found) walking a ranking's order: (N,) each.

    order: (N,) training indices, most suspicious first; flipped: (N,) bool, the labels flipped on purpose.
    """
    found = np.cumsum(np.asarray(flipped, dtype=bool)[order]) / max(1, int(np.sum(flipped)))
    inspected = np.arange(1, len(order) + 1) / len(order)
    return inspected, found
