"""What a run's model says about examples: predicted probabilities, penultimate features, a 2-D map."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import SettingsError
from .inputs import batches
from .methods.baselines import representations
from .run import Run
from .task import Task


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
