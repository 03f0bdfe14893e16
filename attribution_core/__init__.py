"""tda-explorer's attribution core: which training examples made the model do what it did.

The front door, importable from the package itself:

    from attribution_core import load_run, attribute
    scores = attribute(load_run("workspace", "fmnist-mlp"), "trak", queries=[0, 1, 2])

Names are loaded on first use (PEP 562), so `import attribution_core` stays cheap and a part you
do not use (cleanlab for mislabel rankings, say) need not be installed.

Layout, bottom up (tests/test_project.py checks that no module imports from a layer above it):
- errors, progress, settings, store, task, models, data: errors a user can act on, progress
  callbacks, settings validation, the atomic workspace, the Task extension point, models, data;
- gradients (layer capture), inputs (AttributionInputs, chunking), run (Run, its recipe and
  checkpoints), projection (projectors only), features (a data set's projected gradients),
  training (train / retrain), record (what every step trained on), replay (the recorded run
  as a differentiable function), recorder (a user's own loop recorded as a run), importing
  (finished checkpoints as a run), curvature (K-FAC / EK-FAC), segments (SOURCE's plan), linalg;
- methods/: one module per method, each a `Method` subclass declaring what it is (base.py);
  METHODS in methods/__init__.py is the registry;
- api (the front door: attribute, self_influence, prepare), inspection, scores;
- evaluation/ (lds, counterfactual, mislabel, dynamics, smoothness), exports, demo, cli.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_run": "run", "list_runs": "run", "Run": "run", "Recipe": "run", "Stage": "run", "CheckpointPolicy": "run",
    "train": "training", "retrain": "training",
    "Recorder": "recorder", "RecorderSettings": "recorder", "ArrayData": "recorder", "list_incomplete": "recorder",
    "import_run": "importing",
    "attribute": "api", "self_influence": "api", "prepare": "api", "QueryBatch": "api", "METHODS": "api",
    "Scores": "scores", "Task": "task", "Workspace": "store",
    "DataSpec": "data", "ModelSpec": "models",
    "LdsSettings": "evaluation.lds", "groundtruth": "evaluation.lds", "lds": "evaluation.lds",
    "CounterfactualSettings": "evaluation.counterfactual", "counterfactual": "evaluation.counterfactual",
    "rank_mislabels": "evaluation.mislabel", "mislabel_metrics": "evaluation.mislabel",
}
"""Public name -> the module (under attribution_core) that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a front-door name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attribution_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

