"""What a run's model says about examples: predicted probabilities, penultimate features, a 2-D map."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import SettingsError
from .inputs import batches
from .methods.baselines import representations
from .progress import ProgressFn, no_progress
from .run import Run
from .store import Artifact, atomic_save_npy, load_npy
from .task import Task

LAYOUT_VERSION = 1
"""Bump when map_layout computes positions differently: stored maps then get new keys."""


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


def penultimate_features(run: Run, *, split: str = "train", checkpoint: int = -1, task: Task | None = None) -> np.ndarray:
    """Inputs of the task's representation layer (n, d) (the last tracked nn.Linear): what the classifier head sees."""
    task = task or Task()
    model = run.load_model(checkpoint)
    dataset = _split(run, split)
    return representations(model, task, task.representation_layer(model), batches(dataset.x, dataset.y, 512, torch.device("cpu"))).numpy()


def umap_layout(features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D UMAP positions (n, 2) of feature rows (n, d), seeded so the same features give the same map."""
    import umap  # imported on use: numba compiles it, which takes seconds

    n_neighbors = int(min(15, len(features) - 1))
    return umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=seed, n_jobs=1).fit_transform(features)


@dataclass(frozen=True)
class MapLayout:
    """2-D positions of the training set, (N, 2), and of the test set, (n_test, 2), laid out together."""

    train: np.ndarray
    test: np.ndarray


def _layout_artifact(run: Run, checkpoint: int) -> Artifact:
    index = checkpoint + len(run.checkpoints) if checkpoint < 0 else checkpoint
    return run.artifact("layouts", checkpoint=index, version=LAYOUT_VERSION)


def stored_map_layout(run: Run, checkpoint: int = -1) -> MapLayout | None:
    """The map of a checkpoint when it is stored already, else None (nothing is computed)."""
    artifact = _layout_artifact(run, checkpoint)
    if not artifact.is_complete():
        return None
    return MapLayout(load_npy(artifact.path("train.npy")), load_npy(artifact.path("test.npy")))


def map_layout(run: Run, checkpoint: int = -1, *, progress: ProgressFn = no_progress) -> MapLayout:
    """UMAP of a checkpoint's penultimate features of train and test examples together, computed once and stored.

    Seeded, so the same run gives the same map. progress(done, 3): features of each split, then the layout.
    """

    def compute(stored: Artifact) -> None:
        train_features = penultimate_features(run, split="train", checkpoint=checkpoint)
        progress(1, 3)
        test_features = penultimate_features(run, split="test", checkpoint=checkpoint)
        progress(2, 3)
        positions = umap_layout(np.concatenate([train_features, test_features])).astype(np.float32)
        atomic_save_npy(stored.path("train.npy"), positions[: len(train_features)])
        atomic_save_npy(stored.path("test.npy"), positions[len(train_features) :])
        progress(3, 3)

    _layout_artifact(run, checkpoint).compute_once(compute)
    return stored_map_layout(run, checkpoint)


def query_order(predicted: np.ndarray, confidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Test indices (n,) in the order the app lists them: mispredictions first, most confident first; then correct ones, least confident first.

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
