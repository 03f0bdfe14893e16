"""The front door: `attribute(run, method=..., queries=..., checkpoints=..., settings=...) -> Scores`.

Train-side work (a method's fitted state: projected gradients, curvature) is computed once per (run, task,
method, settings, checkpoints), stored under a content-hash key in runs/<id>/states/<key>/ and reused; scores
of test-set queries are stored under runs/<id>/scores/<key>/ and self-influence under
runs/<id>/self_influence/<key>/. Queries that are not in the data set (an uploaded image) cost
their gradients and a product and are not stored. What a method is (its settings, default
checkpoints, capabilities) is declared by its class (methods/base.py); this module only wires
a run to it.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict, Union

import numpy as np
import torch

from .distributed import agreed, barrier, rank_and_world
from .errors import SettingsError
from .methods import METHODS, method_class
from .methods.base import Method
from .numerics.inputs import AttributionInputs, TrainState
from .progress import ProgressFn, no_progress
from .runs.run import Run
from .scores import Scores
from .store import Artifact, atomic_save_npy, load_npy, load_tensors, save_tensors
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


def state_artifact(run: Run, method: Method, checkpoints: list[int], task: Task) -> Artifact:
    """Where a method's train-side state for these checkpoints and task is stored."""
    return run.artifact(
        "states", method=method.name, settings=dataclasses.asdict(method.settings),
        version=getattr(method.settings, "state_version", 1), checkpoints=checkpoints, task=task.key(),
    )


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


def _record_notes(run: Run) -> list[str]:
    """What the user should know about the scores of a run because of what its record holds."""
    return [] if run.record is not None else [RECORDLESS_NOTE]


def _state_writer(fit: Callable[[], TrainState]) -> Callable[[Artifact], None]:
    """What compute_once runs to store a fitted state."""
    return lambda stored: save_tensors(stored.path("state.safetensors"), fit())


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
    inputs, notes = method_object.prepare_inputs(_inputs(run, checkpoints, resolve_device(device), progress, task, batch_size), run, checkpoints)
    notes = _record_notes(run) + notes
    artifact = state_artifact(run, method_object, checkpoints, task)
    rank, world = rank_and_world()
    if world == 1:  # a second process computing the same state waits on the lock, then reuses it
        artifact.compute_once(_state_writer(lambda: method_object.fit(inputs)))
    elif agreed(not artifact.is_complete()):  # every rank takes part in the sharded fit; rank 0 stores it
        fitted = method_object.fit(inputs)
        if rank == 0:
            artifact.compute_once(_state_writer(lambda: fitted))
        barrier()
    return Prepared(method_object, checkpoints, task, inputs, _loaded_state(artifact, inputs.device), artifact, notes)


STATE_CACHE_BYTES = 4 << 30
"""Fitted states kept loaded in this process (least recently used dropped beyond it): scoring a new block of queries
against a 60,000-example fit then costs the queries' gradients and a product, not a read of the state from disk."""

_state_cache: OrderedDict[tuple[str, int, str], dict[str, torch.Tensor]] = OrderedDict()
_state_cache_lock = threading.Lock()


def _loaded_state(artifact: Artifact, device: torch.device) -> dict[str, torch.Tensor]:
    """A stored fitted state on a device, from this process's cache when its file is unchanged (methods only read states)."""
    path = artifact.path("state.safetensors")
    key = (str(path), path.stat().st_mtime_ns, str(device))
    with _state_cache_lock:
        if key in _state_cache:
            _state_cache.move_to_end(key)
            return _state_cache[key]
    state = {name: tensor.to(device) for name, tensor in load_tensors(path).items()}
    size = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    with _state_cache_lock:
        _state_cache[key] = state
        while len(_state_cache) > 1 and sum(
                tensor.numel() * tensor.element_size() for cached in _state_cache.values() for tensor in cached.values()) > STATE_CACHE_BYTES:
            _state_cache.popitem(last=False)
        if size > STATE_CACHE_BYTES:
            _state_cache.pop(key, None)
    return state


def attribute(run: Run, method: str = "trak", *, queries: list[int] | np.ndarray | QueryBatch | None = None,
              **options: Unpack[PrepareOptions]) -> Scores:
    """Scores of queries (test-set indices, a QueryBatch, or None = the whole test set) against the training set.

    options: checkpoints, settings, progress, device, task, batch_size (see PrepareOptions).
    """
    started = time.perf_counter()
    if not isinstance(queries, QueryBatch):
        stored = stored_scores(run, method, queries=queries, checkpoints=options.get("checkpoints"),
                               settings=options.get("settings"), task=options.get("task"))
        if stored is not None:
            return stored
    prepared = prepare(run, method, **options)
    train_set, test_set = run.datasets()
    if isinstance(queries, QueryBatch):
        values, segment_values = _score(prepared, queries.x, queries.y)
        query_y, names, key, query_indices = queries.y, list(queries.names), "", None
    else:
        query_indices = _test_indices(run, queries)
        query_y, names = test_set.y[query_indices], [f"test {i}" for i in query_indices]
        artifact = run.artifact("scores", state=prepared.state_key, queries=query_indices.tolist())
        values, segment_values = _stored_scores(artifact, prepared, test_set.x[query_indices], query_y)
        key = artifact.directory.name
    return Scores(
        values=values, method=method, settings=dataclasses.asdict(prepared.method.settings), checkpoints=prepared.checkpoints,
        train_ids=train_set.ids, query_labels=query_y.numpy(), query_names=names, query_indices=query_indices,
        self_influence=_free_self_influence(run, prepared), segment_values=segment_values,
        notes=prepared.notes, key=key, seconds=time.perf_counter() - started,
    )


def stored_scores(run: Run, method: str = "trak", *, queries: list[int] | np.ndarray | None = None,
                  checkpoints: list[int] | None = None, settings: MethodSettings = None, task: Task | None = None) -> Scores | None:
    """The scores `attribute` would return for these test-set queries when they are stored already, else None.

    Nothing is fitted, scored or even loaded beyond the stored arrays: a page can ask this on every
    click and hand the work to a job when the answer is None.
    """
    started = time.perf_counter()
    method_object, checkpoints = _method_at(run, method, checkpoints, settings)
    task = task or Task()
    state = state_artifact(run, method_object, checkpoints, task)
    query_indices = _test_indices(run, queries)
    artifact = run.artifact("scores", state=state.directory.name, queries=query_indices.tolist())
    if not (state.is_complete() and artifact.is_complete()):
        return None
    train_set, test_set = run.datasets()
    segments_path = artifact.path("segments.npy")
    self_influence_artifact = run.artifact("self_influence", state=state.directory.name)
    return Scores(
        values=load_npy(artifact.path("scores.npy")), method=method, settings=dataclasses.asdict(method_object.settings),
        checkpoints=checkpoints, train_ids=train_set.ids, query_labels=test_set.y[query_indices].numpy(),
        query_names=[f"test {i}" for i in query_indices], query_indices=query_indices,
        self_influence=load_npy(self_influence_artifact.path("self_influence.npy")) if self_influence_artifact.is_complete() else None,
        segment_values=load_npy(segments_path) if segments_path.exists() else None,
        notes=artifact.manifest().get("notes", _record_notes(run)), key=artifact.directory.name,
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


def _self_influence_artifact(run: Run, prepared: Prepared) -> Artifact:
    return run.artifact("self_influence", state=prepared.state_key)


def _stored_self_influence(run: Run, prepared: Prepared) -> np.ndarray:
    if not prepared.method.has_self_influence:
        raise SettingsError(f"method {prepared.method.name!r} defines no self-influence")

    def compute(artifact: Artifact) -> None:
        values = prepared.method.self_influence(prepared.state, prepared.inputs)
        atomic_save_npy(artifact.path("self_influence.npy"), values.float().cpu().numpy())

    return load_npy(_self_influence_artifact(run, prepared).compute_once(compute).path("self_influence.npy"))


def _free_self_influence(run: Run, prepared: Prepared) -> np.ndarray | None:
    """Self-influence when it costs nothing more: stored already, or held by the fitted state."""
    artifact = _self_influence_artifact(run, prepared)
    if artifact.is_complete() or prepared.method.self_influence_at_fit:
        return _stored_self_influence(run, prepared)
    return None


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


def _stored_scores(artifact: Artifact, prepared: Prepared, query_x: torch.Tensor, query_y: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    rank, world = rank_and_world()
    if world > 1 and prepared.method.shards_queries and agreed(not artifact.is_complete()):
        scored = _score(prepared, query_x, query_y)  # every rank scores its share of the queries; all of them come back
        if rank == 0:
            artifact.compute_once(lambda stored: _save_scores(stored, *scored, prepared.notes))
        barrier()
    else:
        artifact.compute_once(lambda stored: _save_scores(stored, *_score(prepared, query_x, query_y), prepared.notes))
    segments_path = artifact.path("segments.npy")
    return load_npy(artifact.path("scores.npy")), (load_npy(segments_path) if segments_path.exists() else None)
