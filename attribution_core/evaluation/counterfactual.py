"""The counterfactual check: remove a query's top proponents, retrain, and watch its margin move.

For one test query, a method's top-k proponents (and, separately, its top-k opponents) are
removed from the training set, the run is retrained by its own training function with the same
seeds (runs/training.retrain), and the query's correct-class margin and predicted class are compared with those of the
model trained on everything, and with k random removals. Stored as JSON under
runs/<id>/counterfactual/<key>/: each finished retrain as its own small file (a killed check
resumes, and torchrun ranks share the retrains: distributed.py), result.json with the manifest at
the end.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..api import MethodSettings, attribute
from ..distributed import torchrun_shard, wait_for_files
from ..errors import SettingsError
from ..methods import method_class
from ..progress import ProgressFn, no_progress
from ..runs.run import Run
from ..runs.threads import one_thread
from ..runs.training import retrain
from ..store import Artifact, atomic_write_json, read_json
from ..task import Task
from ..validation import check_settings


@dataclass(frozen=True)
class CounterfactualSettings:
    """How many examples are removed, against how many random draws, retrained with which seeds."""

    k: float = field(default=0.05, metadata={"help": "examples removed: a fraction of the training set (< 1) or a count (>= 1)"})
    n_random: int = field(default=3, metadata={"help": "random removals of the same size, the baseline"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "retraining seed offsets from the run's seed (0 = the run's own seed)"})
    random_seed: int = field(default=0, metadata={"help": "numpy seed of the random removals"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        check_settings(
            self,
            k=self.k > 0 and (self.k < 1 or float(self.k).is_integer()),
            n_random=self.n_random >= 0,
            seeds=len(self.seeds) >= 1 and min(self.seeds) >= 0 and len(set(self.seeds)) == len(self.seeds),
            random_seed=self.random_seed >= 0,
        )

    def removal_count(self, n_train: int) -> int:
        """k as a number of training examples, checked to leave some behind."""
        count = round(self.k * n_train) if self.k < 1 else int(self.k)
        if not 1 <= count < n_train:
            raise SettingsError(f"k={self.k} removes {count} of {n_train} training examples; choose 1..{n_train - 1}")
        return count


@dataclass
class CounterfactualResult:
    """Margins of one query after retraining without each removal, per seed.

    removed: removal kind ("proponents", "opponents", "random_0", ...) -> removed train indices.
    margins / predictions: kind -> per seed, the query's margin / predicted class after retraining.
    base_margins / base_predictions: per seed, the same with the full training set.
    """

    query: int
    method: str
    k: int
    true_label: int
    base_margins: list[float]
    removed: dict[str, list[int]]
    margins: dict[str, list[float]]
    predictions: dict[str, list[int]]
    base_predictions: list[int]
    seeds: list[int] = field(default_factory=lambda: [0])

    def margin_change(self, kind: str) -> float:
        """Mean over seeds of the query's margin without the removal minus with everything."""
        return float(np.mean(np.subtract(self.margins[kind], self.base_margins)))

    def flipped(self, kind: str) -> list[bool]:
        """Per seed, whether the removal changed the predicted class."""
        return [after != before for after, before in zip(self.predictions[kind], self.base_predictions)]


def removals(values: np.ndarray, count: int, settings: CounterfactualSettings) -> dict[str, list[int]]:
    """Train indices to remove per kind, from one query's scores values: (N,)."""
    generator = np.random.default_rng(settings.random_seed)
    chosen = {
        "proponents": np.argsort(-values, kind="stable")[:count],
        "opponents": np.argsort(values, kind="stable")[:count],
    }
    for draw in range(settings.n_random):
        chosen[f"random_{draw}"] = np.sort(generator.choice(len(values), size=count, replace=False))
    return {kind: [int(i) for i in indices] for kind, indices in chosen.items()}


@torch.no_grad()
def query_outcome(model: torch.nn.Module, task: Task, x: torch.Tensor, label: int) -> tuple[float, int]:
    """(the task's measurement, predicted class) of one example x: (1, ...) under a model."""
    model.eval()
    x = x.to(next(model.parameters()).device)
    y = torch.tensor([label], device=x.device)
    return float(task.measurement(model, x, y)[0]), int(task.predictions(model, x).argmax(1)[0])


def _retrained_outcome(run: Run, task: Task, artifact: Artifact, name: str, keep: np.ndarray, seed_offset: int,
                       x: torch.Tensor, label: int) -> None:
    """Retrain without the removed examples, measure the query, store the outcome as name.json."""
    with one_thread():  # see threads.one_thread: small models retrain faster on one thread
        model = retrain(run, keep, seed=run.recipe.seed + seed_offset, task=task)
    margin, prediction = query_outcome(model, task, x, label)
    atomic_write_json(artifact.path(f"{name}.json"), {"margin": margin, "prediction": prediction})


def _artifact(run: Run, query: int, method: str, settings: CounterfactualSettings, checkpoints: list[int] | None,
              method_settings: MethodSettings, task: Task) -> Artifact:
    """Where the check of one query is stored: keyed by the method with its settings and checkpoints, the removal and the task."""
    train_set, test_set = run.datasets()
    if not 0 <= query < len(test_set):
        raise SettingsError(f"query {query} is not a test index of run {run.run_id!r} (0..{len(test_set) - 1})")
    method_object = method_class(method)(method_settings)
    checkpoints = run.resolve_checkpoints(checkpoints, method_object.default_checkpoints(len(run.checkpoints)))
    return run.artifact(
        "counterfactual", query=query, method=method, method_settings=dataclasses.asdict(method_object.settings),
        checkpoints=checkpoints, k=settings.removal_count(len(train_set)), seeds=list(settings.seeds), n_random=settings.n_random,
        random_seed=settings.random_seed, task=task.key(),
    )


def stored_counterfactual(run: Run, query: int, method: str = "trak", *, settings: CounterfactualSettings = CounterfactualSettings(),
                          checkpoints: list[int] | None = None, method_settings: MethodSettings = None,
                          task: Task | None = None) -> CounterfactualResult | None:
    """The check `counterfactual` would return when it is stored already, else None (nothing is scored or retrained)."""
    artifact = _artifact(run, query, method, settings, checkpoints, method_settings, task or Task())
    return CounterfactualResult(**read_json(artifact.path("result.json"))) if artifact.is_complete() else None


def counterfactual(
    run: Run,
    query: int,
    method: str = "trak",
    *,
    settings: CounterfactualSettings = CounterfactualSettings(),
    checkpoints: list[int] | None = None,
    method_settings: MethodSettings = None,
    task: Task | None = None,
    progress: ProgressFn = no_progress,
) -> CounterfactualResult:
    """Remove the query's top-k proponents / opponents / k random examples, retrain, measure the query (the task's measurement)."""
    train_set, test_set = run.datasets()
    task = task or Task()
    artifact = _artifact(run, query, method, settings, checkpoints, method_settings, task)
    if artifact.is_complete():
        return CounterfactualResult(**read_json(artifact.path("result.json")))
    scores = attribute(run, method, queries=[query], checkpoints=checkpoints, settings=method_settings, task=task)
    count = settings.removal_count(len(train_set))
    removed = removals(scores.values[0], count, settings)

    x, label = test_set.x[query : query + 1], int(test_set.y[query])
    everything = np.ones(len(train_set), dtype=bool)
    keeps = {"base": everything}
    for kind, indices in removed.items():
        keeps[kind] = everything.copy()
        keeps[kind][indices] = False
    # Retraining on everything with the run's own seed reproduces its final checkpoint: reuse it.
    reused = query_outcome(run.load_model(-1), task, x, label) if 0 in settings.seeds else None
    retrained = [(f"{kind}_s{seed}", keep, seed) for kind, keep in keeps.items() for seed in settings.seeds if (kind, seed) != ("base", 0)]
    rank, world = torchrun_shard()  # under torchrun, rank r retrains jobs r, r + W, ...
    mine = retrained[rank::world]
    done = sum(artifact.path(f"{name}.json").exists() for name, _, _ in mine)
    for name, keep, seed in mine:
        if not artifact.path(f"{name}.json").exists():
            _retrained_outcome(run, task, artifact, name, keep, seed, x, label)
            done += 1
            progress(done, len(mine))
    wait_for_files(artifact.path(f"{name}.json") for name, _, _ in retrained)  # the other ranks' shares
    stored = {name: read_json(artifact.path(f"{name}.json")) for name, _, _ in retrained}
    outcome = {name: (value["margin"], value["prediction"]) for name, value in stored.items()} | (
        {"base_s0": reused} if reused is not None else {}
    )
    base = [outcome[f"base_s{seed}"] for seed in settings.seeds]
    outcomes = {kind: [outcome[f"{kind}_s{seed}"] for seed in settings.seeds] for kind in removed}
    result = CounterfactualResult(
        query=query, method=method, k=count, true_label=label,
        base_margins=[margin for margin, _ in base], removed=removed,
        margins={kind: [margin for margin, _ in pairs] for kind, pairs in outcomes.items()},
        predictions={kind: [prediction for _, prediction in pairs] for kind, pairs in outcomes.items()},
        base_predictions=[prediction for _, prediction in base], seeds=list(settings.seeds),
    )
    artifact.compute_once(lambda stored: atomic_write_json(stored.path("result.json"), dataclasses.asdict(result)))
    return result
