"""The method class: the unit of extension. A method declares what it is and computes in two phases.

Declarations (class attributes), read by the front door, the CLI, the app, the mislabel
rankings and the benchmarks, so that adding a method is one module, one line in METHODS
(methods/__init__.py) and its test:
- `name` (the key everywhere: CLI, URL, stored manifests), `label` (how people read it),
  `Settings` (a dataclass whose fields have defaults and help), `preset` (settings fixed by
  this method, e.g. K-FAC is influence with curvature="kfac");
- `checkpoint_policy`: the checkpoints it uses by default ("last", "last5" or "all");
- `has_self_influence`, `self_influence_at_fit` (the fitted state holds it, so it is free to
  show beside every score), `has_segments` (per-segment contributions, `score_segments`);
- `max_parameters`: the largest model it accepts (None: no limit);
- `estimates_removal`: True when a score estimates the change of the query's measurement from
  training with the example rather than without it (the one unit the app states for influence,
  SOURCE, TRAK and replay); False for similarities (TracIn, gradient dot/cosine, representation
  similarity), whose scale means nothing and which the app shows with a percentile instead.
- `quick`: its fit is one forward pass over the training set and a block of scores one product (no
  per-example gradients): what a large run's pages show while a heavier method's fit runs
  (jobs/ready.py);
- `shards_queries`: `score` shares the queries between the ranks of a process group (every rank
  calls it and gets all the scores), so the front door calls it on every rank.

Phases:
- `fit(inputs) -> TrainState`: the train-side work (features, curvature, preconditioned
  gradients), done once per (run, task, method, settings, checkpoints) and stored;
- `score(state, inputs, query_x, query_y) -> (n_queries, n_train)` in the project's one sign
  convention: positive = proponent (including the training example raises the query's
  measurement). Scoring new queries costs their gradients and a product.
- `self_influence(state, inputs) -> (n_train,)` where `has_self_influence`.
`prepare_inputs(inputs, run, checkpoints)` is the hook for inputs only some methods need
(SOURCE plans its segments there).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import SettingsError
from ..numerics.inputs import AttributionInputs, TrainState
from ..runs.run import Run

CHECKPOINT_POLICIES = ("last", "last5", "all")


class Method(ABC):
    """Base class of every attribution method (see the module docstring)."""

    name: ClassVar[str]
    label: ClassVar[str]
    Settings: ClassVar[type]
    preset: ClassVar[Mapping[str, Any]] = {}
    checkpoint_policy: ClassVar[str] = "last"
    has_self_influence: ClassVar[bool] = False
    self_influence_at_fit: ClassVar[bool] = False
    has_segments: ClassVar[bool] = False
    max_parameters: ClassVar[int | None] = None
    shards_queries: ClassVar[bool] = False
    estimates_removal: ClassVar[bool] = True
    quick: ClassVar[bool] = False

    def __init__(self, settings: Any = None):
        self.settings = self.make_settings(settings)

    @classmethod
    def make_settings(cls, settings: Any = None) -> Any:
        """The method's settings from an instance, a mapping of overrides, or None (defaults), with the preset applied."""
        if isinstance(settings, cls.Settings):
            return dataclasses.replace(settings, **cls.preset) if cls.preset else settings
        if settings is not None and not isinstance(settings, Mapping):
            raise SettingsError(f"{cls.name}: settings must be a {cls.Settings.__name__} or a mapping of its fields, "
                                f"not {type(settings).__name__}")
        known = [f.name for f in dataclasses.fields(cls.Settings)]
        unknown = set(settings or {}) - set(known)
        if unknown:
            raise SettingsError(f"{cls.name}: unknown settings {sorted(unknown)}; known settings: {', '.join(known)}")
        return cls.Settings(**(dict(settings or {}) | dict(cls.preset)))

    @classmethod
    def default_checkpoints(cls, n_checkpoints: int) -> list[int]:
        """The checkpoint indices the method uses when the caller does not choose."""
        if cls.checkpoint_policy == "last":
            return [n_checkpoints - 1]
        if cls.checkpoint_policy == "last5":
            return list(range(max(0, n_checkpoints - 5), n_checkpoints))
        return list(range(n_checkpoints))

    @classmethod
    def unsupported_reason(cls, run: Run) -> str | None:
        """Why the method cannot attribute this run (e.g. the model is too large), or None when it can."""
        n_parameters = run.metrics.get("n_parameters")
        if cls.max_parameters is not None and n_parameters is not None and n_parameters > cls.max_parameters:
            return f"{cls.label} handles models of up to {cls.max_parameters:,} parameters; this one has {n_parameters:,}"
        return None

    def streams_training_set(self) -> bool:
        """Whether scoring a block of queries passes over the whole training set again with these settings (the methods
        whose settings say k=None: exact dot products, unprojected influence): heavy work on a large run."""
        return getattr(self.settings, "k", 0) is None

    def prepare_inputs(self, inputs: AttributionInputs, run: Run, checkpoints: list[int]) -> tuple[AttributionInputs, list[str]]:
        """The inputs with anything this method needs beyond the common ones, and notes for the user."""
        return inputs, []

    @abstractmethod
    def fit(self, inputs: AttributionInputs) -> TrainState:
        """The train-side state, stored once per run, task, settings and checkpoints."""

    @abstractmethod
    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train), positive = proponent."""

    def score_segments(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Per-segment contributions (n_segments, n_queries, n_train) that sum to `score` (methods with has_segments)."""
        raise SettingsError(f"method {self.name!r} has no per-segment contributions")

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """τ(z_m, z_m) of every training example (n_train,) (methods with has_self_influence)."""
        raise SettingsError(f"method {self.name!r} defines no self-influence")
