"""The smoothness check: do first-order predictions hold for this run and query?

Every method here predicts the effect of removing training examples linearly: removing a set S
changes the query's measurement by about −Σ_{i∈S} τ(z_q, z_i). Whether that holds depends on the
run (ReLU networks are only piecewise smooth in the example weights). For a few random removals
of a small fraction of the training set, this check compares the prediction with the actual
change after an order-keeping retrain (the run's training function given the recorded batches
with the removed examples weighted 0 in their slots: runs/training.retrain), which is exactly
what replay's derivative predicts to first order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..api import attribute
from ..errors import SettingsError
from ..evaluation.counterfactual import query_outcome
from ..progress import ProgressFn, no_progress
from ..runs.run import Run
from ..runs.threads import one_thread
from ..runs.training import retrain
from ..scores import Scores
from ..store import Artifact, atomic_write_json, read_json
from ..task import Task
from ..validation import check_settings


@dataclass(frozen=True)
class SmoothnessSettings:
    """How many random removals, of what size."""

    n_removals: int = field(default=3, metadata={"help": "random removals, each retrained by replay"})
    fraction: float = field(default=0.01, metadata={"help": "fraction of the training set each removal takes out (0 < fraction < 1)"})
    seed: int = field(default=0, metadata={"help": "numpy seed of the removals"})

    def __post_init__(self) -> None:
        check_settings(self, n_removals=self.n_removals >= 1, fraction=0 < self.fraction < 1, seed=self.seed >= 0)


@dataclass
class SmoothnessResult:
    """Per removal: the removed training indices, the predicted and the actual change of the query's measurement."""

    query: int
    removed: list[list[int]]
    predicted: list[float]
    actual: list[float]


def smoothness_check(run: Run, scores: Scores, query: int, settings: SmoothnessSettings = SmoothnessSettings(), *,
                     progress: ProgressFn = no_progress) -> SmoothnessResult:
    """Predicted (−Σ of the removed examples' scores) against actual (order-keeping retrain) changes of one test query's measurement."""
    if scores.query_indices is None or query not in set(scores.query_indices.tolist()):
        raise SettingsError(f"the scores hold no row for test query {query}: attribute it first")
    row = scores.values[list(scores.query_indices).index(query)]
    _, test_set = run.datasets()
    x, label, task = test_set.x[query : query + 1], int(test_set.y[query]), Task()

    def measured(weights: np.ndarray) -> float:
        with one_thread():  # see threads.one_thread: small models retrain faster on one thread
            model = retrain(run, weights=weights, order_keeping=True, task=task)
        return query_outcome(model, task, x, label)[0]

    n_train, generator = len(row), np.random.default_rng(settings.seed)
    count = max(1, round(settings.fraction * n_train))
    base = measured(np.ones(n_train, dtype=np.float32))
    removed, predicted, actual = [], [], []
    for done in range(1, settings.n_removals + 1):
        chosen = np.sort(generator.choice(n_train, size=count, replace=False))
        weights = np.ones(n_train, dtype=np.float32)
        weights[chosen] = 0
        removed.append(chosen.tolist())
        predicted.append(-float(row[chosen].sum()))
        actual.append(measured(weights) - base)
        progress(done, settings.n_removals)
    return SmoothnessResult(query, removed, predicted, actual)


def _artifact(run: Run, query: int, method: str, checkpoints: list[int], settings: SmoothnessSettings) -> Artifact:
    return run.artifact("smoothness", query=int(query), method=method, checkpoints=list(checkpoints), settings=dataclasses.asdict(settings))


def stored_smoothness(run: Run, query: int, method: str, *, checkpoints: list[int], settings: SmoothnessSettings = SmoothnessSettings()
                      ) -> SmoothnessResult | None:
    """The check `smoothness` would return when it is stored already, else None (nothing is computed)."""
    artifact = _artifact(run, query, method, checkpoints, settings)
    return SmoothnessResult(**read_json(artifact.path("result.json"))) if artifact.is_complete() else None


def smoothness(run: Run, query: int, method: str, *, checkpoints: list[int], settings: SmoothnessSettings = SmoothnessSettings(),
               progress: ProgressFn = no_progress) -> SmoothnessResult:
    """smoothness_check of a method's scores (its default settings, these checkpoints) of one test query, computed once and stored."""

    def compute(stored: Artifact) -> None:
        scores = attribute(run, method, queries=[query], checkpoints=checkpoints)
        result = smoothness_check(run, scores, query, settings, progress=progress)
        atomic_write_json(stored.path("result.json"), dataclasses.asdict(result))

    _artifact(run, query, method, checkpoints, settings).compute_once(compute)
    return stored_smoothness(run, query, method, checkpoints=checkpoints, settings=settings)
