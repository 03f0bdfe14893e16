"""The Map page's 2-D layout: UMAP of the penultimate-layer features of training and test examples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from attribution_core import inspection
from attribution_core.run import Run

from .core_calls import remembered, run_key


@dataclass(frozen=True)
class Embedding:
    """2-D positions of the training set, (N, 2), and of the test set, (n_test, 2)."""

    train: np.ndarray
    test: np.ndarray


def embedding(run: Run, checkpoint: int) -> Embedding:
    """UMAP of train and test features together (seeded, so the same run gives the same map)."""

    def compute() -> Embedding:
        with st.status("Laying out the map (UMAP of penultimate-layer features)…", expanded=False) as status:
            train_features = inspection.penultimate_features(run, split="train", checkpoint=checkpoint)
            test_features = inspection.penultimate_features(run, split="test", checkpoint=checkpoint)
            positions = inspection.umap_layout(np.concatenate([train_features, test_features]))
            status.update(label="Map laid out", state="complete")
        return Embedding(positions[: len(train_features)], positions[len(train_features) :])

    return remembered(("embedding", *run_key(run), checkpoint), compute)
