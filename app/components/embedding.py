"""The Map page's 2-D layout: UMAP of the penultimate-layer features of training and test examples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st
from torch import nn

from attribution_core.methods.baselines import representations
from attribution_core.projection import batches
from attribution_core.task import Task
from attribution_core.training import Run

from .core_calls import remembered, run_key


@dataclass(frozen=True)
class Embedding:
    """2-D positions of the training set, (N, 2), and of the test set, (n_test, 2)."""

    train: np.ndarray
    test: np.ndarray


def penultimate_features(run: Run, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the model's last tracked nn.Linear at a checkpoint: (train (N, d), test (n_test, d))."""
    model = run.load_model(checkpoint)
    task = Task()
    last_linear = [module for module in task.tracked_modules(model).values() if isinstance(module, nn.Linear)][-1]
    device = next(model.parameters()).device
    return tuple(
        representations(model, task, last_linear, batches(dataset.x, dataset.y, 512, device)).cpu().numpy()
        for dataset in run.datasets()
    )


def embedding(run: Run, checkpoint: int) -> Embedding:
    """UMAP of train and test features together (seeded, so the same run gives the same map)."""

    def compute() -> Embedding:
        with st.status("Laying out the map (UMAP of penultimate-layer features)…", expanded=False) as status:
            import umap  # imported here: it compiles with numba on first use, which takes seconds

            train_features, test_features = penultimate_features(run, checkpoint)
            features = np.concatenate([train_features, test_features])
            n_neighbors = int(min(15, len(features) - 1))
            positions = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, random_state=0, n_jobs=1).fit_transform(features)
            status.update(label="Map laid out", state="complete")
        return Embedding(positions[: len(train_features)], positions[len(train_features) :])

    return remembered(("embedding", *run_key(run), checkpoint), compute)
