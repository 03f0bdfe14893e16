"""What a run's model says about examples: predicted probabilities, its penultimate-layer representations, a 2-D map.

"Representations" are what the classifier head sees (the inputs of the last tracked nn.Linear); "features" elsewhere in the
core are projected gradients (TRAK's φ), and a method's fitted train-side state is its "state".
"""
from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import SettingsError
from .methods.baselines import representations
from .numerics.inputs import batches
from .progress import ProgressFn, no_progress
from .runs.run import Run
from .store import Artifact, atomic_save_npy, load_npy
from .task import Task

LAYOUT_VERSION = 2
"""Bump when map_layout computes positions differently: stored maps then get new keys (2: landmark layout)."""

LANDMARKS = 4000
"""Rows UMAP lays out itself; every other row is placed from its nearest landmarks (landmark_layout). Below umap's
4,096, where it finds neighbours exactly: UMAP's cost grows faster than linearly (10,000 rows took 15 times as long as
2,000 here), the placement grows linearly, so a 60,000- or 600,000-point map costs one UMAP of 4,000 rows and a pass of
nearest-landmark products."""

NEIGHBOURS = 8
"""Landmarks a row is placed between, by inverse distance in representation space."""


def _split(run: Run, split: str):
    train_set, test_set = run.datasets()
    if split not in ("train", "test"):
        raise SettingsError(f"split {split!r}: choose train or test")
    return train_set if split == "train" else test_set


@torch.no_grad()
def model_probabilities(model: nn.Module, task: Task, x: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """The task's predictive probabilities (n, n_classes) of a model on inputs x (n, ...) on the model's device, chunk by chunk."""
    model.eval()
    return torch.cat([task.predictions(model, x[start : start + batch_size]).cpu() for start in range(0, len(x), batch_size)]).numpy()


def predict(run: Run, x: torch.Tensor | None = None, *, split: str = "test", checkpoint: int = -1,
            batch_size: int = 1024, task: Task | None = None) -> np.ndarray:
    """Predicted probabilities (n, n_classes) of a checkpoint's model on x, or on the run's train/test split."""
    inputs = _split(run, split).x if x is None else x
    return model_probabilities(run.load_model(checkpoint), task or Task(), inputs, batch_size=batch_size)


def penultimate_representations(run: Run, *, split: str = "train", checkpoint: int = -1, task: Task | None = None) -> np.ndarray:
    """Inputs of the task's representation layer (n, d) (the last tracked nn.Linear): what the classifier head sees."""
    task = task or Task()
    model = run.load_model(checkpoint)
    dataset = _split(run, split)
    return representations(model, task, task.representation_layer(model), batches(dataset.x, dataset.y, 512, torch.device("cpu"))).numpy()


EXACT_NEIGHBOURS_ROWS = 4096
"""Below this many rows umap finds neighbours exactly, from all pairwise distances (above, by NN-descent)."""


def pairwise_euclidean(rows: np.ndarray) -> np.ndarray:
    """Euclidean distances (n, n) between rows (n, d), in float64, exactly 0 on the diagonal."""
    x = torch.as_tensor(rows, dtype=torch.float64)
    norms = x.square().sum(1)
    squared = (norms[:, None] - 2 * x @ x.T + norms).clamp_min_(0)
    squared.fill_diagonal_(0)
    return squared.sqrt_().numpy()


def umap_layout(rows: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D UMAP positions (n, 2) of rows (n, d) (representations), seeded so the same rows give the same map."""
    import umap  # imported on use: numba compiles it, which takes seconds

    n_neighbors = int(min(15, len(rows) - 1))
    settings = dict(n_neighbors=n_neighbors, min_dist=0.1, random_state=seed, n_jobs=1)
    if len(rows) >= EXACT_NEIGHBOURS_ROWS:
        return umap.UMAP(**settings).fit_transform(rows)
    # For the exact neighbours umap asks scikit-learn's pairwise_distances for every pair through its numba metric called
    # from Python, one call per pair: 25 s of a 4,000-landmark map's 32. One matrix product gives the same distances.
    with warnings.catch_warnings():  # that a precomputed metric has no inverse_transform, which the map never uses
        warnings.filterwarnings("ignore", message="using precomputed metric", category=UserWarning)
        return umap.UMAP(metric="precomputed", **settings).fit_transform(pairwise_euclidean(rows))


@functools.cache
def umap_compiling() -> threading.Thread:
    """A thread that compiles umap's numba code, started once per process: the first layout of a process spends about
    18 s compiling (2 cores), and a caller that has rows to compute first overlaps the two; join() it before laying out."""
    rows = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    thread = threading.Thread(target=umap_layout, args=(rows,), name="umap-compile", daemon=True)
    thread.start()
    return thread


def landmark_layout(rows: np.ndarray, *, seed: int = 0, landmarks: int = LANDMARKS, neighbours: int = NEIGHBOURS,
                    chunk: int = 8192) -> np.ndarray:
    """2-D positions (n, 2) of rows (n, d): UMAP of a seeded sample of `landmarks` rows, the others placed among them.

    A row that is not a landmark sits at the inverse-distance-weighted mean of its `neighbours` nearest
    landmarks (Euclidean, in representation space), as UMAP's own transform starts it; with no more
    rows than landmarks it is umap_layout itself. Memory: one (chunk x landmarks) block of distances.
    """
    if len(rows) <= landmarks:
        return umap_layout(rows, seed=seed)
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=landmarks, replace=False))
    anchored = umap_layout(rows[chosen], seed=seed).astype(np.float32)
    positions = np.empty((len(rows), 2), dtype=np.float32)
    positions[chosen] = anchored
    others = np.setdiff1d(np.arange(len(rows)), chosen)
    anchors = torch.as_tensor(rows[chosen], dtype=torch.float32)
    anchor_norms, anchor_positions = anchors.square().sum(1), torch.from_numpy(anchored)
    for start in range(0, len(others), chunk):
        placed = others[start : start + chunk]
        x = torch.as_tensor(rows[placed], dtype=torch.float32)
        squared = (x.square().sum(1, keepdim=True) - 2 * x @ anchors.T + anchor_norms).clamp_min_(0)
        nearest, index = squared.topk(neighbours, dim=1, largest=False)
        weights = 1 / (nearest.sqrt() + 1e-6)
        positions[placed] = ((weights[..., None] * anchor_positions[index]).sum(1) / weights.sum(1, keepdim=True)).numpy()
    return positions


@dataclass(frozen=True)
class MapLayout:
    """2-D positions of the training set, (N, 2), and of the test set, (n_test, 2), laid out together."""

    train: np.ndarray
    test: np.ndarray


def inside_box(positions: np.ndarray, x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
    """(n,) whether each of positions (n, 2) lies in the box spanning x and y (either order, edges included)."""
    (x0, x1), (y0, y1) = sorted(x), sorted(y)
    return (positions[:, 0] >= x0) & (positions[:, 0] <= x1) & (positions[:, 1] >= y0) & (positions[:, 1] <= y1)


def inside_polygon(positions: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) whether each of positions (n, 2) lies inside the closed polygon with vertices (x, y) (even-odd rule).

    Only points in the polygon's bounding box are tested, edge by edge (a ray cast to the right crosses an edge).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = np.zeros(len(positions), dtype=bool)
    if len(x) < 3:
        return inside
    candidates = np.flatnonzero(inside_box(positions, (x.min(), x.max()), (y.min(), y.max())))
    px, py = positions[candidates, 0].astype(np.float64), positions[candidates, 1].astype(np.float64)
    crossings = np.zeros(len(candidates), dtype=bool)
    for (x0, y0), (x1, y1) in zip(zip(x, y), zip(np.roll(x, 1), np.roll(y, 1))):
        spans = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossings ^= spans & (px < (x1 - x0) * (py - y0) / (y1 - y0) + x0)
    inside[candidates] = crossings
    return inside


def _layout_artifact(run: Run, checkpoint: int) -> Artifact:
    index = run.checkpoint_index(checkpoint)
    return run.artifact("layouts", checkpoint=index, version=LAYOUT_VERSION)


def stored_map_layout(run: Run, checkpoint: int = -1) -> MapLayout | None:
    """The map of a checkpoint when it is stored already, else None (nothing is computed)."""
    artifact = _layout_artifact(run, checkpoint)
    if not artifact.is_complete():
        return None
    return MapLayout(load_npy(artifact.path("train.npy")), load_npy(artifact.path("test.npy")))


def map_layout(run: Run, checkpoint: int = -1, *, progress: ProgressFn = no_progress) -> MapLayout:
    """A checkpoint's penultimate-layer representations of train and test examples laid out together (landmark_layout).

    Computed once and stored.

    Seeded, so the same run gives the same map. progress(done, 3): representations of each split, then the layout.
    """

    def compute(stored: Artifact) -> None:
        compiling = umap_compiling()
        train_rows = penultimate_representations(run, split="train", checkpoint=checkpoint)
        progress(1, 3)
        test_rows = penultimate_representations(run, split="test", checkpoint=checkpoint)
        progress(2, 3)
        compiling.join()
        positions = landmark_layout(np.concatenate([train_rows, test_rows])).astype(np.float32)
        atomic_save_npy(stored.path("train.npy"), positions[: len(train_rows)])
        atomic_save_npy(stored.path("test.npy"), positions[len(train_rows) :])
        progress(3, 3)

    _layout_artifact(run, checkpoint).compute_once(compute)
    return stored_map_layout(run, checkpoint)


def query_order(predicted: np.ndarray, confidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Test indices (n,) in the order the app lists them.

    Mispredictions first, most confident first; then correct ones, least confident first.

    predicted, confidence, labels: (n,) the predicted class, its probability and the true class of each test sample.
    """
    wrong = np.asarray(predicted) != np.asarray(labels)
    indices = np.arange(len(wrong))
    mistaken = indices[wrong][np.argsort(-np.asarray(confidence)[wrong], kind="stable")]
    right = indices[~wrong][np.argsort(np.asarray(confidence)[~wrong], kind="stable")]
    return np.concatenate([mistaken, right])


def test_probabilities(run: Run) -> np.ndarray:
    """The final model's predicted probabilities on the test set (n_test, n_classes), computed once and stored."""

    def compute(stored: Artifact) -> None:
        atomic_save_npy(stored.path("probabilities.npy"), predict(run, split="test").astype(np.float32))

    artifact = run.artifact("predictions", checkpoint=len(run.checkpoints) - 1, split="test")
    return load_npy(artifact.compute_once(compute).path("probabilities.npy"))


REPRESENTATIONS_VERSION = 1
"""Bump when representation_index computes representations differently: stored indexes then get new keys."""


@dataclass(frozen=True)
class RepresentationIndex:
    """Penultimate-layer representations of one checkpoint scaled to unit length: train (N, d), test (n_test, d); a cosine is
    one dot product."""

    checkpoint: int
    train: np.ndarray
    test: np.ndarray


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows (n, d) divided by their length (a zero row stays zero), as float32."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _representations_artifact(run: Run, checkpoint: int) -> Artifact:
    index = run.checkpoint_index(checkpoint)
    return run.artifact("representations", checkpoint=index, version=REPRESENTATIONS_VERSION)


def stored_representation_index(run: Run, checkpoint: int = -1) -> RepresentationIndex | None:
    """The representation index of a checkpoint when it is stored already, else None (nothing is computed)."""
    artifact = _representations_artifact(run, checkpoint)
    if not artifact.is_complete():
        return None
    index = run.checkpoint_index(checkpoint)
    return RepresentationIndex(index, load_npy(artifact.path("train.npy")), load_npy(artifact.path("test.npy")))


def representation_index(run: Run, checkpoint: int = -1, *, progress: ProgressFn = no_progress) -> RepresentationIndex:
    """Unit-length penultimate-layer representations of the training and test sets at a checkpoint, computed once and stored.

    What find-similar compares (cosine of what the classifier head sees). progress(done, 2): one step per split.
    """

    def compute(stored: Artifact) -> None:
        for done, split in enumerate(("train", "test"), start=1):
            rows = penultimate_representations(run, split=split, checkpoint=checkpoint)
            atomic_save_npy(stored.path(f"{split}.npy"), unit_rows(rows))
            progress(done, 2)

    _representations_artifact(run, checkpoint).compute_once(compute)
    return stored_representation_index(run, checkpoint)


def most_similar(index: RepresentationIndex, split: str, example: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices (k,), cosines (k,)) of the training examples whose representations are closest to one example's, most similar first.

    split: "train" or "test", the split of `example`; a training example is never its own neighbour.
    """
    if split not in ("train", "test"):
        raise SettingsError(f"split {split!r}: choose train or test")
    vector = (index.train if split == "train" else index.test)[example]
    cosines = index.train @ vector
    if split == "train":
        cosines[example] = -np.inf
    order = np.argsort(-cosines, kind="stable")[:k]
    return order, cosines[order]


def top_scores(values: np.ndarray, k: int, *, keep: np.ndarray | None = None, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, scores) of the k highest (largest=True) or lowest of one row of scores.

    values: (N,); keep: (N,) bool, the indices to choose among (all when None).
    """
    candidates = np.arange(len(values)) if keep is None else np.flatnonzero(keep)
    order = candidates[np.argsort(-values[candidates] if largest else values[candidates], kind="stable")[:k]]
    return order, values[order]


def score_ranks(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(len(indices),) each chosen example's rank by score among all of values: (N,), 1 = highest; ties share the best rank."""
    ordered = np.sort(values)
    return len(values) - np.searchsorted(ordered, values[indices], side="right") + 1


def predicted_removal_change(values: np.ndarray, removed: list[int]) -> float:
    """The first-order prediction of a query's measurement change when the training examples `removed` are left out.

    values: (N,) one query's scores from a method that estimates removal (Method.estimates_removal): each is the
    predicted drop when its example is removed, so removing several is predicted to change it by minus their sum.
    """
    return -float(np.asarray(values, dtype=np.float64)[list(removed)].sum())
