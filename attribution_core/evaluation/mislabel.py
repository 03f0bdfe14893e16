"""Mislabel detection: rank training examples by how suspicious their label is.

Rankings: from the training record's dynamics (dynamics.py: early-training loss, AUM,
forgetting, learning time, data-map confidence and variability, cleanlab's self-confidence on early-training
probabilities, and "dynamics", their chosen combination), self-influence of an attribution
method (an example that only its own gradient explains), the training loss at chosen checkpoints
(or averaged over them), and confident learning (cleanlab) on out-of-sample probabilities from
k-fold cross-validated retraining. Each ranking is stored under runs/<id>/mislabels/<key>/ and
reused. With labels flipped on purpose, `mislabel_metrics` says how many flips each ranking finds.

Each ranking is one declaration, a `Ranking` in RANKINGS (its name, label, description, compute
function, default checkpoints, and whether it needs the training record or an attribution method);
ranking_label, rankings_for, ranking_checkpoints, the stored key and the computation read it.

Adding a ranking: one `Ranking(...)` in `_declared_rankings()` below and its test (against a direct
computation). Nothing else: `tdx mislabels --ranking` lists RANKINGS, the app's Mislabels page offers
rankings_for(run), and its job (jobs/kinds.py "ranking") and the store take any name RANKINGS holds;
tests/test_extensions.py declares a ranking and checks that they do. A method whose class declares
has_self_influence gets its "self_influence:<method>" ranking from the same list.
"""
from __future__ import annotations

import time
from collections.abc import Callable
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
from ..runs.training import retrain, why_not_retrainable
from ..store import Artifact, atomic_save_npy, load_npy
from ..task import Task
from .dynamics import COMBINED, SIGNALS, combined, has_dynamics, signal_scores
from .dynamics import settings as dynamics_settings

FALLBACK_RANKING = "loss_avg"
"""The ranking of a run without training dynamics: the loss averaged over its checkpoints."""


def declared_ranking(name: str) -> "Ranking":
    """The declaration of a ranking, or a SettingsError listing the rankings there are."""
    if name not in RANKINGS:
        raise SettingsError(f"unknown ranking {name!r}; choose one of {', '.join(RANKINGS)}")
    return RANKINGS[name]


def ranking_label(name: str) -> str:
    """A ranking's name for people: "Self-influence (TRAK)" for "self_influence:trak"."""
    return declared_ranking(name).label


def rankings_for(run: Run) -> dict[str, str]:
    """The rankings a run supports: name -> description.

    RANKINGS less those whose attribution method cannot attribute the run, less those that read
    the training record where the run has no record of per-example losses (missing_dynamics), and
    less those that retrain k folds where tdx cannot train the run again (why_not_retrainable).
    """
    dynamic, retrainable = missing_dynamics(run) is None, why_not_retrainable(run) is None
    return {name: ranking.description for name, ranking in RANKINGS.items()
            if (dynamic or not ranking.needs_record) and (retrainable or not ranking.folds)
            and (ranking.method is None or METHODS[ranking.method].unsupported_reason(run) is None)}


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
    return FALLBACK_RANKING, f"{reason}. Ranking by {FALLBACK_RANKING} ({RANKINGS[FALLBACK_RANKING].description}) instead."


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


def ranking_checkpoints(run: Run, ranking: str, checkpoints: list[int] | None) -> list[int]:
    """The checkpoints a ranking uses: the caller's (sorted, negatives from the end) or its default; none for one that reads none."""
    default = declared_ranking(ranking).checkpoints
    if default is None:
        return []
    return run.resolve_checkpoints(checkpoints, default(len(run.checkpoints)))


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


RankingCompute = Callable[[Run, list[int], Task, int, ProgressFn], tuple[np.ndarray, np.ndarray | None]]
"""compute(run, checkpoints, task, folds, progress) -> (scores (N,), higher = more suspicious; suggested labels (N,) or None)."""


@dataclass(frozen=True)
class Ranking:
    """One mislabel ranking, declared once: what every consumer (the CLI, the app, its job, the store) reads about it."""

    name: str
    """The key everywhere: `tdx mislabels --ranking`, the page's URL, stored manifests."""
    label: str
    """How a page names it."""
    description: str
    """What it measures, in one line."""
    compute: RankingCompute
    checkpoints: Callable[[int], list[int]] | None = None
    """The checkpoints it uses by default, of n_checkpoints; None: it reads no checkpoint (a caller's choice is ignored)."""
    needs_record: bool = False
    """It reads the training record's per-example losses (a run without them cannot use it; the record's settings key it)."""
    method: str | None = None
    """The attribution method it needs (a run that method cannot attribute cannot use it)."""
    folds: bool = False
    """It retrains k folds: their number is part of its stored key."""


def _last(n_checkpoints: int) -> list[int]:
    return [n_checkpoints - 1]


def _every(n_checkpoints: int) -> list[int]:
    return list(range(n_checkpoints))


def _dynamics_scores(signal: str | None) -> RankingCompute:
    """A record's signal (None: their combination), suggesting the earliest checkpoint's prediction (see MislabelRanking)."""

    def compute(run: Run, checkpoints: list[int], task: Task, folds: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
        train_set, _ = run.datasets()
        scores = combined(run.record, len(train_set)) if signal is None else signal_scores(run.record, len(train_set), signal)
        earliest = model_probabilities(run.load_model(0), task, train_set.x)  # one pass: only the probabilities are needed
        progress(1, 1)
        return scores, earliest.argmax(1)

    return compute


def _self_influence_scores(method: str) -> RankingCompute:
    """Self-influence under an attribution method, suggesting the chosen checkpoints' mean prediction."""

    def compute(run: Run, checkpoints: list[int], task: Task, folds: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
        _, _, probabilities = checkpoint_outputs(run, checkpoints, task)
        scores = self_influence(run, method, checkpoints=checkpoints, progress=progress, task=task)
        return np.asarray(scores, dtype=np.float64), probabilities.mean(0).argmax(1)

    return compute


def _mean_loss(run: Run, checkpoints: list[int], task: Task, folds: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
    """The training loss averaged over the checkpoints, suggesting their mean prediction."""
    losses, _, probabilities = checkpoint_outputs(run, checkpoints, task, progress=progress)
    return losses.mean(0).astype(np.float64), probabilities.mean(0).argmax(1)


def _mean_negative_margin(run: Run, checkpoints: list[int], task: Task, folds: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
    """Minus the measurement (the correct-class margin) averaged over the checkpoints, suggesting their mean prediction."""
    _, margins, probabilities = checkpoint_outputs(run, checkpoints, task, progress=progress)
    return -margins.mean(0).astype(np.float64), probabilities.mean(0).argmax(1)


def _cleanlab(run: Run, checkpoints: list[int], task: Task, folds: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
    """1 − cleanlab's self-confidence on k-fold out-of-sample probabilities, suggesting their most probable class."""
    train_set, _ = run.datasets()
    probabilities = cross_validated_probabilities(run, task, folds=folds, progress=progress)
    quality = label_quality_scores(train_set.y.numpy(), probabilities, method="self_confidence")
    return 1.0 - quality, probabilities.argmax(1)


def _declared_rankings() -> list[Ranking]:
    """Every ranking, in the order the CLI and the app list them (the record's first: the default where a run has one)."""
    combined_of = " and ".join(SIGNALS[name].label[0].lower() + SIGNALS[name].label[1:] for name in COMBINED)
    return [
        Ranking("dynamics", "Training dynamics (early loss and margin)",
                f"rank average of {combined_of}: what the training record says before the model memorises (default)",
                _dynamics_scores(None), needs_record=True),
        *(Ranking(name, signal.label, signal.description, _dynamics_scores(name), needs_record=True)
          for name, signal in SIGNALS.items()),
        # a method label's own parenthesis ("exact influence (small models)") would nest in the ranking's
        *(Ranking(f"self_influence:{name}", f"Self-influence ({method.label.split(' (')[0]})",
                  f"self-influence τ(z, z) of {method.label}: examples only their own gradient explains",
                  _self_influence_scores(name), checkpoints=method.default_checkpoints, method=name)
          for name, method in METHODS.items() if method.has_self_influence),
        Ranking("loss", "Loss at chosen checkpoints", "training loss at the chosen checkpoints (default: the last)",
                _mean_loss, checkpoints=_last),
        Ranking("loss_avg", "Mean loss over checkpoints",
                "training loss averaged over the chosen checkpoints (default: all; AUM-style)", _mean_loss, checkpoints=_every),
        Ranking("margin_avg", "Mean margin over checkpoints",
                "minus the correct-class margin averaged over the chosen checkpoints (default: all)", _mean_negative_margin,
                checkpoints=_every),
        Ranking("cleanlab", "Confident learning (cleanlab, cross-validated)",
                "confident learning (cleanlab self-confidence) on k-fold cross-validated probabilities", _cleanlab, folds=True),
    ]


RANKINGS: dict[str, Ranking] = {ranking.name: ranking for ranking in _declared_rankings()}
"""Every mislabel ranking by name, as declared."""

DYNAMICS_RANKINGS: tuple[str, ...] = tuple(name for name, ranking in RANKINGS.items() if ranking.needs_record)
"""The rankings read from the training record alone (no model is run but the earliest, for its suggestions)."""


def _compute(run: Run, ranking: str, checkpoints: list[int], task: Task, folds: int,
             progress: ProgressFn) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores (N,), suggested labels (N,) or None) of one ranking, by its declared compute function."""
    return RANKINGS[ranking].compute(run, checkpoints, task, folds, progress)


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
    declared = declared_ranking(ranking)
    if folds < 2:
        raise SettingsError(f"folds={folds}: cross-validation needs at least 2 folds")
    if declared.needs_record and (missing := missing_dynamics(run)) is not None:
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
    declared = declared_ranking(ranking)
    # the dynamics rankings' settings are in their key, so that a change to them is not answered by a stale ranking
    dynamic = {"dynamics": dynamics_settings(), "suggested": "earliest checkpoint"} if declared.needs_record else {}
    return run.artifact("mislabels", ranking=ranking, checkpoints=checkpoints, folds=folds if declared.folds else None,
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
