"""Where the front door stores what it computes: one key builder per artifact, each keyed by everything it is made from.

- runs/<id>/states/<key>/state.safetensors: a method's fitted train-side state (projected gradients, curvature), per
  (run, method, settings, state version, checkpoints, task);
- runs/<id>/scores/<key>/scores.npy (and segments.npy): a block of test-set queries scored against that state;
- runs/<id>/self_influence/<key>/self_influence.npy: every training example's self-influence under that state.
Scores and self-influence are keyed by the state's key, so they are never reused for another fit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .methods.base import Method
from .runs.run import Run
from .store import Artifact
from .task import Task


def state_artifact(run: Run, method: Method, checkpoints: list[int], task: Task) -> Artifact:
    """Where a method's train-side state for these checkpoints and task is stored."""
    return run.artifact(
        "states", method=method.name, settings=dataclasses.asdict(method.settings),
        version=getattr(method.settings, "state_version", 1), checkpoints=checkpoints, task=task.key(),
    )


def scores_artifact(run: Run, state_key: str, queries: Sequence[int]) -> Artifact:
    """Where the scores of these test-set queries (indices, in order) against a stored state are kept."""
    return run.artifact("scores", state=state_key, queries=[int(query) for query in queries])


def self_influence_artifact(run: Run, state_key: str) -> Artifact:
    """Where the self-influence of every training example under a stored state is kept."""
    return run.artifact("self_influence", state=state_key)
