"""Scores: the result of attributing queries to training examples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Scores:
    """Attribution scores of queries against the training set; positive = proponent.

    values: (n_queries, n_train) float32; values[q, m] estimates how including training
        example m changes query q's measurement (correct-class margin by default).
    self_influence: (n_train,) where the method defines it, else None.
    segment_values: (n_segments, n_queries, n_train) per-segment contributions (SOURCE), which
        sum to values; None for other methods.
    query_labels: (n_queries,) the labels the measurement was taken for.
    query_names: how each query is named in the app (e.g. "test 12", "upload 3fa2c1").
    query_indices: (n_queries,) test-set indices of the queries, None for uploaded queries.
    """

    values: np.ndarray
    method: str
    settings: dict[str, Any]
    checkpoints: list[int]
    train_ids: np.ndarray
    query_labels: np.ndarray
    query_names: list[str]
    query_indices: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    segment_values: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    key: str = ""
    seconds: float = 0.0

    @property
    def n_queries(self) -> int:
        return self.values.shape[0]

    def top_proponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, scores) of the k highest-scoring training examples for one query."""
        order = np.argsort(-self.values[query], kind="stable")[:k]
        return order, self.values[query, order]

    def top_opponents(self, query: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, scores) of the k lowest-scoring training examples for one query."""
        order = np.argsort(self.values[query], kind="stable")[:k]
        return order, self.values[query, order]

    def restricted_to_segments(self, segments: list[int]) -> "Scores":
        """Scores from the chosen segments' contributions only (SOURCE)."""
        if self.segment_values is None:
            raise ValueError(f"method {self.method!r} has no per-segment contributions")
        values = self.segment_values[segments].sum(axis=0)
        return Scores(values, self.method, self.settings | {"segments_used": list(segments)}, self.checkpoints,
                      self.train_ids, self.query_labels, self.query_names, self.query_indices, None,
                      self.segment_values[segments],
                      self.notes, self.key, self.seconds)


def top_k_overlap(first: np.ndarray, second: np.ndarray, k: int) -> int:
    """How many training examples two score rows (N,) share among their k highest."""
    top_first = np.argsort(-first, kind="stable")[:k]
    top_second = np.argsort(-second, kind="stable")[:k]
    return len(np.intersect1d(top_first, top_second))


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman correlation of two score rows (N,) over every training example (nan if one is constant)."""
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")
    # imported on use: scipy.stats takes a second to import, and every page of the app imports this module
    from scipy.stats import spearmanr

    return float(spearmanr(first, second).statistic)
