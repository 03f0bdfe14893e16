"""The front door: `attribute(run, method=..., queries=..., checkpoints=..., settings=...) -> Scores`.

Train-side work (features, curvature) is computed once per (run, method, settings,
checkpoints), stored under a content-hash key in runs/<id>/features/<key>/ and reused; scores
of test-set queries are stored under runs/<id>/scores/<key>/. Queries that are not in the data
set (an uploaded image) cost their gradients and a product and are not stored.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distributed import agreed, barrier, rank_and_world
from .errors import SettingsError
from .methods.base import AttributionInputs, ProgressFn, Segment, no_progress
from .scores import Scores
from .store import Artifact, atomic_save_npy, content_key, load_npy, load_tensors, save_tensors
from .task import Task
from .training import Run


@dataclass(frozen=True)
class MethodEntry:
    """Where a method lives, its settings overrides, and which checkpoints it uses by default."""

    module: str
    method_class: str
    settings_class: str
    default_checkpoints: str  # "last", "last5" or "all"
    fixed_settings: tuple[tuple[str, Any], ...] = ()
    label: str = ""


METHODS: dict[str, MethodEntry] = {
    "trak": MethodEntry("trak", "Trak", "TrakSettings", "last5", label="TRAK"),
    "source": MethodEntry("source", "Source", "SourceSettings", "all", label="SOURCE"),
    "ekfac": MethodEntry("influence", "Influence", "InfluenceSettings", "last", (("curvature", "ekfac"),), "EK-FAC influence"),
    "kfac": MethodEntry("influence", "Influence", "InfluenceSettings", "last", (("curvature", "kfac"),), "K-FAC influence"),
    "tracin": MethodEntry("tracin", "TracIn", "TracInSettings", "all", label="TracIn"),
    "graddot": MethodEntry("baselines", "GradientDot", "GradientSimilaritySettings", "last", label="gradient dot"),
    "gradcos": MethodEntry("baselines", "GradientCosine", "GradientSimilaritySettings", "last", label="gradient cosine"),
    "repsim": MethodEntry("baselines", "RepresentationSimilarity", "RepresentationSettings", "last",
                          label="representation similarity"),
    "exact_if": MethodEntry("exact", "ExactInfluence", "ExactSettings", "last", label="exact influence (small models)"),
}
"""Every method the front door knows, by the name the CLI, the app and the benchmarks use."""


@dataclass(frozen=True)
class QueryBatch:
    """Queries that are not test-set indices (e.g. uploaded images): inputs, labels, names."""

    x: torch.Tensor
    y: torch.Tensor
    names: list[str]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _entry(method: str) -> MethodEntry:
    if method not in METHODS:
        raise SettingsError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def _load(entry: MethodEntry, attribute: str):
    return getattr(importlib.import_module(f"attribution_core.methods.{entry.module}"), attribute)


def make_settings(method: str, settings: Any = None):
    """The method's settings dataclass from an instance, a dict of overrides, or None (defaults)."""
    entry = _entry(method)
    settings_class = _load(entry, entry.settings_class)
    if isinstance(settings, settings_class):
        return settings
    overrides = dict(entry.fixed_settings) | dict(settings or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(settings_class)}
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(settings_class))
        raise SettingsError(f"{method}: unknown settings {sorted(unknown)}; known settings: {known}")
    return settings_class(**overrides)


def default_checkpoints(run: Run, method: str) -> list[int]:
    """The checkpoints a method uses when the caller does not choose."""
    n = len(run.checkpoints)
    policy = _entry(method).default_checkpoints
    if policy == "last":
        return [n - 1]
    if policy == "last5":
        return list(range(max(0, n - 5), n))
    return list(range(n))


def checkpoint_learning_rates(run: Run, checkpoints: list[int]) -> list[float]:
    """The learning rate in force at each checkpoint (that of the step just before it)."""
    return [run.trajectory.lr[run.checkpoints[index].step - 1] for index in checkpoints]


def build_segments(run: Run, checkpoints: list[int], settings: Any, models: dict[int, torch.nn.Module]) -> tuple[list[Segment], list[str]]:
    """SOURCE's segments over the chosen checkpoints, with eta*K read from the trajectory."""
    from .methods.source import build_segments as segments_from_plans
    from .segments import plan_segments

    infos = [run.checkpoints[index] for index in checkpoints]
    split = plan_segments(
        [info.step for info in infos],
        [info.stage for info in infos],
        np.asarray(run.trajectory.lr),
        np.asarray(run.trajectory.momentum),
        list(run.trajectory.optimizer),
        n_segments=settings.n_segments,
        ranges=None if settings.segments is None else [tuple(pair) for pair in settings.segments],
    )
    return segments_from_plans(split.segments, [models[index] for index in checkpoints]), list(split.notes)


def _inputs(run: Run, method: str, settings: Any, checkpoints: list[int], device: torch.device,
            progress: ProgressFn, task: Task, batch_size: int) -> tuple[AttributionInputs, list[str]]:
    train_set, _ = run.datasets()
    models = {index: run.load_model(index, device) for index in checkpoints}
    segments, notes = (build_segments(run, checkpoints, settings, models) if method == "source" else (None, []))
    inputs = AttributionInputs(
        checkpoints=[models[index] for index in checkpoints],
        checkpoint_lrs=checkpoint_learning_rates(run, checkpoints),
        train_x=train_set.x, train_y=train_set.y, task=task, device=device, batch_size=batch_size,
        progress=progress, segments=segments,
    )
    return inputs, notes


def _validate_checkpoints(run: Run, checkpoints: list[int] | None, method: str) -> list[int]:
    if checkpoints is None:
        return default_checkpoints(run, method)
    n = len(run.checkpoints)
    chosen = sorted({index + n if index < 0 else index for index in checkpoints})
    if not chosen or chosen[0] < 0 or chosen[-1] >= n:
        raise SettingsError(f"checkpoints {checkpoints} out of range: run {run.run_id!r} has checkpoints 0..{n - 1}")
    return chosen


def train_state_key(run: Run, method: str, settings: Any, checkpoints: list[int]) -> str:
    """The content key of a method's train-side state for a run (and of the settings' state version)."""
    return content_key({"run": run.run_id, "created": run.created, "method": method, "settings": dataclasses.asdict(settings),
                        "version": getattr(settings, "state_version", 1), "checkpoints": checkpoints})


@dataclass
class Prepared:
    """A method ready to score: its object, inputs, fitted train-side state and where it is stored."""

    method: str
    settings: Any
    checkpoints: list[int]
    method_object: Any
    inputs: AttributionInputs
    state: dict[str, torch.Tensor]
    state_key: str
    notes: list[str]


def _store_state(artifact: Artifact, state: dict[str, torch.Tensor], manifest: dict) -> None:
    save_tensors(artifact.path("state.safetensors"), state)
    artifact.commit(manifest)


def prepare(
    run: Run,
    method: str = "trak",
    *,
    checkpoints: list[int] | None = None,
    settings: Any = None,
    progress: ProgressFn = no_progress,
    device: str | torch.device = "auto",
    task: Task | None = None,
    batch_size: int = 512,
) -> Prepared:
    """Load the method's stored train-side state for the run, or fit and store it (once)."""
    settings = make_settings(method, settings)
    checkpoints = _validate_checkpoints(run, checkpoints, method)
    device = resolve_device(device)
    entry = _entry(method)
    method_object = _load(entry, entry.method_class)(settings)
    inputs, notes = _inputs(run, method, settings, checkpoints, device, progress, task or Task(), batch_size)
    state_key = train_state_key(run, method, settings, checkpoints)
    artifact = run.workspace.artifact(run.run_id, "features", state_key)
    manifest = {"key": state_key, "method": method, "settings": dataclasses.asdict(settings), "checkpoints": checkpoints}
    rank, world = rank_and_world()
    if world == 1:
        with artifact.lock():  # a second process computing the same state waits, then reuses it
            if not artifact.is_complete():
                _store_state(artifact, method_object.fit(inputs), manifest)
    elif agreed(not artifact.is_complete()):  # every rank takes part in the sharded fit; rank 0 stores it
        fitted = method_object.fit(inputs)
        if rank == 0:
            with artifact.lock():
                _store_state(artifact, fitted, manifest)
        barrier()
    state = {name: tensor.to(device) for name, tensor in load_tensors(artifact.path("state.safetensors")).items()}
    return Prepared(method, settings, checkpoints, method_object, inputs, state, state_key, notes)


def attribute(
    run: Run,
    method: str = "trak",
    *,
    queries: list[int] | np.ndarray | QueryBatch | None = None,
    checkpoints: list[int] | None = None,
    settings: Any = None,
    progress: ProgressFn = no_progress,
    device: str | torch.device = "auto",
    task: Task | None = None,
    batch_size: int = 512,
) -> Scores:
    """Scores of queries (test-set indices, a QueryBatch, or None = the whole test set) against the training set."""
    started = time.perf_counter()
    prepared = prepare(run, method, checkpoints=checkpoints, settings=settings, progress=progress, device=device,
                       task=task, batch_size=batch_size)
    train_set, test_set = run.datasets()
    if isinstance(queries, QueryBatch):
        query_x, query_y, names = queries.x, queries.y, list(queries.names)
        values, segment_values = _score(prepared, query_x, query_y)
        key, query_indices = "", None
    else:
        indices = query_indices = np.arange(len(test_set)) if queries is None else np.asarray(queries, dtype=int)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(test_set)):
            raise SettingsError(f"query indices must lie in 0..{len(test_set) - 1} (the test set of {run.run_id!r})")
        query_x, query_y, names = test_set.x[indices], test_set.y[indices], [f"test {i}" for i in indices]
        key = content_key({"state": prepared.state_key, "queries": indices.tolist()})
        values, segment_values = _stored_scores(run.workspace.artifact(run.run_id, "scores", key), prepared, query_x, query_y, key)
    return Scores(
        values=values, method=method, settings=dataclasses.asdict(prepared.settings), checkpoints=prepared.checkpoints,
        train_ids=train_set.ids, query_labels=query_y.numpy(), query_names=names, query_indices=query_indices,
        self_influence=_stored_self_influence(run, prepared.state_key), segment_values=segment_values,
        notes=prepared.notes, key=key, seconds=time.perf_counter() - started,
    )


def self_influence(
    run: Run,
    method: str = "trak",
    *,
    checkpoints: list[int] | None = None,
    settings: Any = None,
    progress: ProgressFn = no_progress,
    device: str | torch.device = "auto",
    task: Task | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Self-influence (n_train,) of every training example under a method (stored and reused)."""
    prepared = prepare(run, method, checkpoints=checkpoints, settings=settings, progress=progress, device=device,
                       task=task, batch_size=batch_size)
    stored = _stored_self_influence(run, prepared.state_key)
    if stored is not None:
        return stored
    artifact = run.workspace.artifact(run.run_id, "self_influence", prepared.state_key)
    with artifact.lock():
        if not artifact.is_complete():
            values = prepared.method_object.self_influence(prepared.state, prepared.inputs)
            if values is None:
                raise SettingsError(f"method {method!r} defines no self-influence")
            atomic_save_npy(artifact.path("self_influence.npy"), values.float().cpu().numpy())
            artifact.commit({"state": prepared.state_key})
    return load_npy(artifact.path("self_influence.npy"))


def _stored_self_influence(run: Run, state_key: str) -> np.ndarray | None:
    artifact = run.workspace.artifact(run.run_id, "self_influence", state_key)
    return load_npy(artifact.path("self_influence.npy")) if artifact.is_complete() else None


def _score(prepared: Prepared, query_x: torch.Tensor, query_y: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(values (Q, N), per-segment values (L, Q, N) or None)."""
    method_object, state, inputs = prepared.method_object, prepared.state, prepared.inputs
    if hasattr(method_object, "score_segments"):
        segment_values = method_object.score_segments(state, inputs, query_x, query_y).float().cpu().numpy()
        return segment_values.sum(axis=0), segment_values
    return method_object.score(state, inputs, query_x, query_y).float().cpu().numpy(), None


def _stored_scores(artifact: Artifact, prepared: Prepared, query_x: torch.Tensor, query_y: torch.Tensor, key: str):
    with artifact.lock():
        if not artifact.is_complete():
            values, segment_values = _score(prepared, query_x, query_y)
            atomic_save_npy(artifact.path("scores.npy"), values.astype(np.float32))
            if segment_values is not None:
                atomic_save_npy(artifact.path("segments.npy"), segment_values.astype(np.float32))
            artifact.commit({"key": key})
    segments_path = artifact.path("segments.npy")
    return load_npy(artifact.path("scores.npy")), (load_npy(segments_path) if segments_path.exists() else None)
