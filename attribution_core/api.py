"""The front door: `attribute(run, method=..., queries=..., checkpoints=..., settings=...) -> Scores`.

Train-side work (a method's fitted state: projected gradients, curvature) is computed once per (run, task, method,
settings, checkpoints) and stored; so are the scores of test-set queries and self-influence (artifacts.py says where,
under which key). Queries that are not in the data set (an uploaded image) cost their gradients and a product and are
not stored. What a method is (its settings, default checkpoints, capabilities) is declared by its class
(methods/base.py); fitted states stay loaded in the process (state_cache.py); under torchrun the ranks share the work
and rank 0 stores it (store.compute_once_across_ranks). This module only wires a run to them.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict, Union

import numpy as np
import torch

from .artifacts import scores_artifact, self_influence_artifact, state_artifact
from .errors import SettingsError
from .methods import METHODS, method_class
from .methods.base import Method
from .numerics.inputs import AttributionInputs, TrainState
from .progress import ProgressFn, no_progress
from .runs.run import Run
from .scores import Scores
from .state_cache import loaded_state
from .store import Artifact, atomic_save_npy, compute_once_across_ranks, load_npy, save_tensors
from .task import Task

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; annotations are never evaluated at run time here
    from typing_extensions import Unpack

__all__ = ["METHODS", "MethodSettings", "Prepared", "QueryBatch", "attribute", "default_checkpoints", "prepare", "resolve_device",
           "self_influence", "state_artifact", "stored_scores"]


class SettingsDataclass(Protocol):
    """Any method's Settings dataclass (TrakSettings, SourceSettings, ...)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


MethodSettings = Union[SettingsDataclass, Mapping[str, Any], None]
"""A method's settings: an instance of its Settings class, a mapping of field overrides, or None (defaults)."""


class PrepareOptions(TypedDict, total=False):
    """The options `prepare`, `attribute` and `self_influence` share (all keyword-only)."""

    checkpoints: list[int] | None  # checkpoint indices (negative from the end); None: the method's default
    settings: MethodSettings
    progress: ProgressFn  # progress(done, total) while fitting and scoring
    device: str | torch.device  # "auto": CUDA when present, else the CPU
    task: Task | None  # what is trained and measured; None: classification (Task())
    batch_size: int  # examples per chunk of the streamed passes


@dataclass(frozen=True)
class QueryBatch:
    """Queries that are not test-set indices (e.g. uploaded images): inputs, labels, names."""

    x: torch.Tensor
    y: torch.Tensor
    names: list[str]


@dataclass
class Prepared:
    """A method ready to score: the method object, its inputs, its fitted train-side state and where it is stored."""

    method: Method
    checkpoints: list[int]
    task: Task
    inputs: AttributionInputs
    state: dict[str, torch.Tensor]
    artifact: Artifact
    notes: list[str]

    @property
    def state_key(self) -> str:
        """The content key of the stored train-side state."""
        return self.artifact.directory.name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_checkpoints(run: Run, method: str) -> list[int]:
    """The checkpoints a method uses on this run when the caller does not choose."""
    return method_class(method).default_checkpoints(len(run.checkpoints))


def _method_at(run: Run, method: str, checkpoints: list[int] | None, settings: MethodSettings) -> tuple[Method, list[int]]:
    """The method object with its settings, and the checkpoints it uses on this run (its default when None)."""
    method_object = method_class(method)(settings)
    return method_object, run.resolve_checkpoints(checkpoints, method_object.default_checkpoints(len(run.checkpoints)))


def _inputs(run: Run, checkpoints: list[int], device: torch.device, progress: ProgressFn, task: Task, batch_size: int) -> AttributionInputs:
    """The common inputs: the models at the checkpoints, each with its stage's view of the training set and its draw weights."""
    train_set, _ = run.datasets()
    return AttributionInputs(
        models=[run.load_model(index, device) for index in checkpoints],
        checkpoint_lrs=run.checkpoint_learning_rates(checkpoints),
        train_x=train_set.x, train_y=train_set.y, task=task, device=device, batch_size=batch_size, progress=progress,
        views=[run.train_view(run.checkpoints[index].stage) for index in checkpoints],
        weights=[torch.as_tensor(run.checkpoint_weights(index), dtype=torch.float32) for index in checkpoints],
    )


RECORDLESS_NOTE = (
    "this run has no per-step training record (it was trained before records existed, or imported): which examples each "
    "stretch of training drew is taken from the recipe's stage classes, so SOURCE's and TracIn's weights are approximate"
)


AUGMENTED_NOTE = (
    "this run's loop augments its inputs at random: every method scores each training example on its un-augmented image, "
    "in eval mode (the field's convention; benchmarks/RESULTS.md, B8, measures the alternative)"
)


def _record_notes(run: Run) -> list[str]:
    """What the user should know about the scores of a run because of what its record holds and how it was trained."""
    trained_by = run.training_function()
    augmented = trained_by is not None and any(path is not None for _, path in trained_by.augment)
    return ([] if run.record is not None else [RECORDLESS_NOTE]) + ([AUGMENTED_NOTE] if augmented else [])


def _save_state(stored: Artifact, state: TrainState) -> None:
    save_tensors(stored.path("state.safetensors"), state)


def prepare(
    run: Run,
    method: str = "trak",
    *,
    checkpoints: list[int] | None = None,
    settings: MethodSettings = None,
    progress: ProgressFn = no_progress,
    device: str | torch.device = "auto",
    task: Task | None = None,
    batch_size: int = 512,
) -> Prepared:
    """Load the method's stored train-side state for the run, or fit and store it (once)."""
    method_object, checkpoints = _method_at(run, method, checkpoints, settings)
    task = task or Task()
    prepared = _inputs(run, checkpoints, resolve_device(device), progress, task, batch_size)
    inputs, notes = method_object.prepare_inputs(prepared, run, checkpoints)
    notes = _record_notes(run) + notes
    artifact = state_artifact(run, method_object, checkpoints, task)
    compute_once_across_ranks(artifact, lambda: method_object.fit(inputs), _save_state)  # every rank takes part in a sharded fit
    return Prepared(method_object, checkpoints, task, inputs, loaded_state(artifact, inputs.device), artifact, notes)


def attribute(run: Run, method: str = "trak", *, queries: list[int] | np.ndarray | QueryBatch | None = None,
              **options: Unpack[PrepareOptions]) -> Scores:
    """Scores of queries (test-set indices, a QueryBatch, or None = the whole test set) against the training set.

    options: checkpoints, settings, progress, device, task, batch_size (see PrepareOptions).
    """
    started = time.perf_counter()
    if isinstance(queries, QueryBatch):
        prepared = prepare(run, method, **options)
        values, segment_values = _score(prepared, queries.x, queries.y)
        _store_self_influence_at_fit(run, prepared)
        return _assembled(run, prepared.method, prepared.checkpoints, queries, values, segment_values,
                          _stored_self_influence_values(run, prepared.state_key), prepared.notes, "", started)
    stored = stored_scores(run, method, queries=queries, checkpoints=options.get("checkpoints"),
                           settings=options.get("settings"), task=options.get("task"))
    if stored is not None:
        return stored
    prepared = prepare(run, method, **options)
    query_indices = _test_indices(run, queries)
    artifact = scores_artifact(run, prepared.state_key, query_indices)
    _, test_set = run.datasets()
    compute_once_across_ranks(artifact, lambda: _score(prepared, test_set.x[query_indices], test_set.y[query_indices]),
                              lambda stored_, scored: _save_scores(stored_, *scored, prepared.notes),
                              collective=prepared.method.shards_queries)  # every rank scores its share; all come back
    _store_self_influence_at_fit(run, prepared)
    return _from_store(run, prepared.method, prepared.checkpoints, query_indices, artifact, prepared.state_key, started)


def stored_scores(run: Run, method: str = "trak", *, queries: list[int] | np.ndarray | None = None,
                  checkpoints: list[int] | None = None, settings: MethodSettings = None, task: Task | None = None) -> Scores | None:
    """The scores `attribute` would return for these test-set queries when they are stored already, else None.

    Nothing is fitted, scored or even loaded beyond the stored arrays: a page can ask this on every
    click and hand the work to a job when the answer is None.
    """
    started = time.perf_counter()
    method_object, checkpoints = _method_at(run, method, checkpoints, settings)
    state = state_artifact(run, method_object, checkpoints, task or Task())
    query_indices = _test_indices(run, queries)
    artifact = scores_artifact(run, state.directory.name, query_indices)
    if not (state.is_complete() and artifact.is_complete()):
        return None
    return _from_store(run, method_object, checkpoints, query_indices, artifact, state.directory.name, started)


def _from_store(run: Run, method: Method, checkpoints: list[int], query_indices: np.ndarray, artifact: Artifact, state_key: str,
                started: float) -> Scores:
    """The Scores a complete scores artifact holds, with the self-influence stored under its state when there is one."""
    segments_path = artifact.path("segments.npy")
    return _assembled(run, method, checkpoints, query_indices, load_npy(artifact.path("scores.npy")),
                      load_npy(segments_path) if segments_path.exists() else None, _stored_self_influence_values(run, state_key),
                      artifact.manifest().get("notes", _record_notes(run)), artifact.directory.name, started)


def _assembled(run: Run, method: Method, checkpoints: list[int], queries: np.ndarray | QueryBatch, values: np.ndarray,
               segment_values: np.ndarray | None, self_influence_values: np.ndarray | None, notes: list[str], key: str,
               started: float) -> Scores:
    """The one place a Scores is made: values (Q, N) of queries (test-set indices, or a QueryBatch) and what goes with them."""
    train_set, test_set = run.datasets()
    if isinstance(queries, QueryBatch):
        labels, names, indices = queries.y, list(queries.names), None
    else:
        labels, names, indices = test_set.y[queries], [f"test {index}" for index in queries], queries
    return Scores(
        values=values, method=method.name, settings=dataclasses.asdict(method.settings), checkpoints=checkpoints,
        train_ids=train_set.ids, query_labels=labels.numpy(), query_names=names, query_indices=indices,
        self_influence=self_influence_values, segment_values=segment_values, notes=notes, key=key,
        seconds=time.perf_counter() - started,
    )


def _test_indices(run: Run, queries: list[int] | np.ndarray | None) -> np.ndarray:
    """Test-set indices (None: the whole test set), checked against the run's test set."""
    _, test_set = run.datasets()
    indices = np.arange(len(test_set)) if queries is None else np.asarray(queries, dtype=int)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(test_set)):
        raise SettingsError(f"query indices must lie in 0..{len(test_set) - 1} (the test set of {run.run_id!r})")
    return indices


def self_influence(run: Run, method: str = "trak", **options: Unpack[PrepareOptions]) -> np.ndarray:
    """Self-influence (n_train,) of every training example under a method (stored and reused).

    options: checkpoints, settings, progress, device, task, batch_size (see PrepareOptions).
    """
    return _stored_self_influence(run, prepare(run, method, **options))


def _stored_self_influence(run: Run, prepared: Prepared) -> np.ndarray:
    if not prepared.method.has_self_influence:
        raise SettingsError(f"method {prepared.method.name!r} defines no self-influence")

    def compute(artifact: Artifact) -> None:
        values = prepared.method.self_influence(prepared.state, prepared.inputs)
        atomic_save_npy(artifact.path("self_influence.npy"), values.float().cpu().numpy())

    return load_npy(self_influence_artifact(run, prepared.state_key).compute_once(compute).path("self_influence.npy"))


def _store_self_influence_at_fit(run: Run, prepared: Prepared) -> None:
    """Store the self-influence when the fitted state holds it (it costs nothing more), so that every score shows it."""
    if prepared.method.self_influence_at_fit:
        _stored_self_influence(run, prepared)


def _stored_self_influence_values(run: Run, state_key: str) -> np.ndarray | None:
    """The self-influence (n_train,) stored under a state, or None when none is."""
    artifact = self_influence_artifact(run, state_key)
    return load_npy(artifact.path("self_influence.npy")) if artifact.is_complete() else None


def _score(prepared: Prepared, query_x: torch.Tensor, query_y: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(values (Q, N), per-segment values (L, Q, N) or None)."""
    method, state, inputs = prepared.method, prepared.state, prepared.inputs
    if method.has_segments:
        segment_values = method.score_segments(state, inputs, query_x, query_y).float().cpu().numpy()
        return segment_values.sum(axis=0), segment_values
    return method.score(state, inputs, query_x, query_y).float().cpu().numpy(), None


def _save_scores(stored: Artifact, values: np.ndarray, segment_values: np.ndarray | None, notes: list[str]) -> dict[str, Any]:
    """Write scored values (and per-segment values) into the artifact; the manifest's extra entries."""
    atomic_save_npy(stored.path("scores.npy"), values.astype(np.float32))
    if segment_values is not None:
        atomic_save_npy(stored.path("segments.npy"), segment_values.astype(np.float32))
    return {"notes": notes}  # read back by stored_scores, which never prepares the method
