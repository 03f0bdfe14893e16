"""Linear datamodeling score (Park et al. 2023): retrain on random subsets, rank-correlate predictions.

Ground truth: M random subsets S_m of the training set (each a fraction alpha of it), one model
retrained per (subset, seed) by the run's own training function (runs/training.retrain), and the task's measurement f_j(S_m) (the
correct-class margin by default) of every test example j. A method predicts g_j(S_m) = sum_{i in S_m} tau(z_j, z_i); LDS_j is the Spearman
correlation over m of (g_j, f_j), reported as a mean over queries with its standard error.

The ground truth is stored under runs/<id>/groundtruth/<key>/: masks.npy first, then one
margins_<m>_s<s>.npy per finished model (written atomically, so a killed job resumes where it
stopped), and finally margins.npy (seeds averaged) with the manifest. Work shards over local
processes (`workers`) and over torchrun ranks (RANK / WORLD_SIZE): every model is computed from
the same mask and seed wherever it runs, so sharding never changes the result.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from ..distributed import torchrun_shard, wait_for_files
from ..errors import SettingsError
from ..numerics.inputs import batches
from ..progress import ProgressFn, no_progress
from ..runs.run import Run, load_run
from ..runs.threads import one_thread
from ..runs.training import retrain
from ..scores import Scores
from ..store import Artifact, atomic_save_npy, load_npy
from ..task import Task
from ..validation import check_settings

MODES = ("reshuffled", "order_keeping")
"""How a subset's model is retrained: the question each ground truth asks (see LdsSettings.mode)."""


@dataclass(frozen=True)
class LdsSettings:
    """How the LDS ground truth is sampled and retrained."""

    n_subsets: int = field(default=100, metadata={"help": "M, the number of random training subsets (>= 2)"})
    alpha: float = field(default=0.5, metadata={"help": "fraction of the training set each subset keeps (0 < alpha < 1)"})
    seed: int = field(default=0, metadata={"help": "numpy seed of the subset masks"})
    seeds_per_subset: int = field(default=1, metadata={"help": "retraining seeds per subset; their margins are averaged (reshuffled mode)"})
    mode: str = field(default="reshuffled", metadata={"help": (
        "reshuffled: each subset retrained from scratch by the run's training function, its batches drawn anew; order_keeping: the run's "
        "training function given the recorded batches in their order with the removed examples weighted 0 in their batch slots (MAGIC's "
        "evaluation; use alpha 0.95, i.e. 5 % removed)")})

    def __post_init__(self) -> None:
        check_settings(
            self,
            n_subsets=self.n_subsets >= 2,
            alpha=0 < self.alpha < 1,
            seed=self.seed >= 0,
            seeds_per_subset=self.seeds_per_subset >= 1 and (self.mode == "reshuffled" or self.seeds_per_subset == 1),
            mode=self.mode in MODES,
        )


@dataclass
class GroundTruth:
    """Retrained measurements on random subsets.

    masks: (M, N) bool, masks[m, i] is True when subset m keeps training example i.
    margins: (M, n_test) float32, correct-class margin of each test example after retraining on
        subset m (averaged over the seeds per subset).
    """

    masks: np.ndarray
    margins: np.ndarray
    settings: LdsSettings
    key: str


@dataclass
class LdsResult:
    """LDS of one method's scores against a ground truth.

    per_query: (Q,) Spearman correlation over subsets for each query; nan where the prediction
        or the measurement is constant over subsets (excluded from the mean, see n_valid).
    predicted: (Q, M) g_j(S_m) = sum of the query's scores over the subset's examples.
    actual: (Q, M) the retrained margins f_j(S_m).
    query_indices: (Q,) test-set indices of the queries.
    """

    per_query: np.ndarray
    mean: float
    stderr: float
    predicted: np.ndarray
    actual: np.ndarray
    query_indices: np.ndarray
    n_valid: int = 0


def subset_masks(n_train: int, settings: LdsSettings) -> np.ndarray:
    """(M, N) bool masks of the random subsets, each keeping round(alpha * N) examples."""
    rng = np.random.default_rng(settings.seed)
    size = round(settings.alpha * n_train)
    masks = np.zeros((settings.n_subsets, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return masks


def groundtruth_artifact(run: Run, settings: LdsSettings, task: Task | None = None) -> Artifact:
    """Where a run's ground truth under these settings and task is stored."""
    return run.artifact("groundtruth", settings=dataclasses.asdict(settings), task=(task or Task()).key())


def _model_file(subset: int, seed_offset: int) -> str:
    return f"margins_{subset:04d}_s{seed_offset}.npy"


def _all_models(settings: LdsSettings) -> list[tuple[int, int]]:
    """Every (subset, seed offset) pair the ground truth needs, in order."""
    return [(m, s) for m in range(settings.n_subsets) for s in range(settings.seeds_per_subset)]


@torch.no_grad()
def measurements_on_test_set(model: torch.nn.Module, run: Run, task: Task, *, batch_size: int = 1024) -> np.ndarray:
    """(n_test,) float32 measurement of every test example under a model (the correct-class margin by default)."""
    _, test_set = run.datasets()
    model.eval()
    chunks = batches(test_set.x, test_set.y, batch_size, next(model.parameters()).device)
    return torch.cat([task.measurement(model, x, y) for _, x, y in chunks]).float().cpu().numpy()


def _compute_model(run: Run, task: Task, settings: LdsSettings, artifact: Artifact, mask: np.ndarray, subset: int, seed_offset: int,
                   device: str) -> None:
    """Retrain one model on one subset and store its test margins.

    Always single-threaded, wherever it runs (this process, a worker, a torchrun rank), so that
    sharding never changes a bit of the result; parallelism comes from workers instead.
    """
    with one_thread():
        if settings.mode == "order_keeping":
            model = retrain(run, weights=mask.astype(np.float32), order_keeping=True, task=task, device=device)
        else:
            model = retrain(run, mask, seed=run.recipe.seed + seed_offset, task=task, device=device)
        atomic_save_npy(artifact.path(_model_file(subset, seed_offset)), measurements_on_test_set(model, run, task))


_WORKER_RUN: tuple[Run, Task, LdsSettings] | None = None


def _init_worker(workspace_root: str, run_id: str, task: Task, settings: LdsSettings) -> None:
    """Per worker process: the run (loaded once), the task and the ground truth's settings."""
    global _WORKER_RUN
    _WORKER_RUN = load_run(workspace_root, run_id), task, settings


def _worker_model(directory: str, mask: np.ndarray, subset: int, seed_offset: int, device: str) -> None:
    """One model, in a worker process (the artifact is passed by path: workers share no objects)."""
    if _WORKER_RUN is None:
        raise RuntimeError("ground-truth worker used before _init_worker ran")
    _compute_model(*_WORKER_RUN, Artifact(Path(directory)), mask, subset, seed_offset, device)


def _compute_missing(run: Run, task: Task, settings: LdsSettings, artifact: Artifact, masks: np.ndarray, todo: list[tuple[int, int]], *,
                     done: int, total: int, progress: ProgressFn, workers: int, device: str) -> None:
    """Compute the listed models, in this process or a spawned pool, reporting each one finished."""
    if workers <= 1:
        for subset, seed_offset in todo:
            _compute_model(run, task, settings, artifact, masks[subset], subset, seed_offset, device)
            done += 1
            progress(done, total)
        return
    context = get_context("spawn")  # fork would copy torch's thread pools and locks
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(str(run.workspace.root), run.run_id, task, settings)) as pool:
        futures = [pool.submit(_worker_model, str(artifact.directory), masks[m], m, s, device) for m, s in todo]
        for future in as_completed(futures):
            future.result()
            done += 1
            progress(done, total)


def _merge(artifact: Artifact, settings: LdsSettings) -> None:
    """Average each subset's seeds into margins.npy (committed by compute_once)."""
    margins = np.stack([
        np.mean([load_npy(artifact.path(_model_file(m, s))) for s in range(settings.seeds_per_subset)], axis=0)
        for m in range(settings.n_subsets)
    ]).astype(np.float32)
    atomic_save_npy(artifact.path("margins.npy"), margins)


def groundtruth(
    run: Run,
    settings: LdsSettings = LdsSettings(),
    *,
    task: Task | None = None,
    progress: ProgressFn = no_progress,
    workers: int = 1,
    device: str = "cpu",
) -> GroundTruth:
    """The run's LDS ground truth under the task's measurement: computed (or resumed) once, stored, then loaded."""
    if workers < 1:
        raise SettingsError(f"workers={workers}: use at least 1 process")
    task = task or Task()
    stored = load_groundtruth(run, settings, task)
    if stored is not None:
        return stored
    artifact = groundtruth_artifact(run, settings, task)
    train_set, _ = run.datasets()
    masks = subset_masks(len(train_set), settings)
    if not artifact.path("masks.npy").exists():
        atomic_save_npy(artifact.path("masks.npy"), masks)
    rank, world = torchrun_shard()
    models = _all_models(settings)
    mine = [(m, s) for m, s in models if m % world == rank]
    todo = [(m, s) for m, s in mine if not artifact.path(_model_file(m, s)).exists()]
    _compute_missing(run, task, settings, artifact, masks, todo, done=len(mine) - len(todo), total=len(mine),
                     progress=progress, workers=workers, device=device)
    wait_for_files(artifact.path(_model_file(m, s)) for m, s in models)  # the other ranks' shares
    artifact.compute_once(lambda stored: _merge(stored, settings))
    return GroundTruth(masks, load_npy(artifact.path("margins.npy")), settings, artifact.directory.name)


def groundtruth_status(run: Run, settings: LdsSettings, task: Task | None = None) -> tuple[int, int]:
    """(models done, models total) of a run's ground truth, from the files present."""
    artifact, total = groundtruth_artifact(run, settings, task), settings.n_subsets * settings.seeds_per_subset
    if artifact.is_complete():
        return total, total
    return sum(artifact.path(_model_file(m, s)).exists() for m, s in _all_models(settings)), total


def load_groundtruth(run: Run, settings: LdsSettings, task: Task | None = None) -> GroundTruth | None:
    """The stored ground truth, or None when it is not complete."""
    artifact = groundtruth_artifact(run, settings, task)
    if not artifact.is_complete():
        return None
    return GroundTruth(load_npy(artifact.path("masks.npy")), load_npy(artifact.path("margins.npy")), settings, artifact.directory.name)


def stored_groundtruth_settings(run: Run, task: Task | None = None) -> list[LdsSettings]:
    """LdsSettings of every complete ground truth stored for the run under the task, oldest first."""
    key = (task or Task()).key()
    return [LdsSettings(**artifact.inputs["settings"]) for artifact in run.workspace.artifacts(run.run_id, "groundtruth")
            if artifact.inputs.get("task") == key]


def rowwise_spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(Q,) Spearman correlation of each row pair of (Q, M) arrays; nan where a row is constant."""
    ranks_p = rankdata(predicted, axis=1)
    ranks_a = rankdata(actual, axis=1)
    ranks_p -= ranks_p.mean(axis=1, keepdims=True)
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    norms = np.sqrt((ranks_p**2).sum(axis=1) * (ranks_a**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ranks_p * ranks_a).sum(axis=1) / norms, np.nan)


def lds(scores: Scores, truth: GroundTruth) -> LdsResult:
    """LDS of test-set scores against a ground truth (queries matched by test index)."""
    if scores.query_indices is None:
        raise SettingsError("LDS needs scores of test-set queries (uploaded queries have no retrained margins)")
    n_train = truth.masks.shape[1]
    if scores.values.shape[1] != n_train:
        raise SettingsError(f"scores cover {scores.values.shape[1]} training examples, the ground truth {n_train}")
    query_indices = np.asarray(scores.query_indices, dtype=int)
    predicted = scores.values.astype(np.float64) @ truth.masks.T.astype(np.float64)
    actual = truth.margins[:, query_indices].T.astype(np.float64)
    per_query = rowwise_spearman(predicted, actual)
    valid = per_query[~np.isnan(per_query)]
    mean = float(valid.mean()) if len(valid) else float("nan")
    stderr = float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else float("nan")
    return LdsResult(per_query, mean, stderr, predicted, actual, query_indices, n_valid=len(valid))
