"""tda-explorer's attribution core: which training examples made the model do what it did.

The front door, importable from the package itself:

    from attribution_core import load_run, attribute
    scores = attribute(load_run("workspace", "fmnist-mlp"), "trak", queries=[0, 1, 2])

Names are loaded on first use (PEP 562), so `import attribution_core` stays cheap and a part you
do not use (cleanlab for mislabel rankings, say) need not be installed.

Layout, bottom up: each layer imports only from the layers below it (LAYERS, checked by
tests/test_project.py; a sub-package orders its own modules in its __init__'s LAYERS):
- foundation (errors, progress, distributed, scores, validation, store, task, models, annotations, data, trust): errors a user can act on,
  progress callbacks, settings validation, the atomic workspace store, the Task extension point, models, data sources, consent to import a
  run's code
- numerics/: the math the methods share: per-layer gradients, projections, curvature, segments, the inputs every method receives
- runs/: how a run is made and kept: its record, training, the Recorder, import, the demo, the replay engine
- methods/: one module per attribution method, each a `Method` subclass declaring what it is
- front door (artifacts, state_cache, api, inspection, exports): where attribute / prepare / self_influence store what they compute and keep
  fitted states loaded, the calls themselves, what the model sees (probabilities, map, representations), exports
- evaluation/: LDS, counterfactual and smoothness checks, mislabel rankings and training dynamics
- cleaning/: from flags to a better model: the cleaning plan, its predicted effect, the run retrained with it beside a random control, the
  cleaned data's exports
- jobs/: long work as background jobs: the queue, what each kind computes, the workers
- entry points (cli, run, recorder, the package): the `tdx` command, old import paths, this front door
"""
from __future__ import annotations

import importlib
from typing import Any, NamedTuple


class Layer(NamedTuple):
    """One layer of the core: a sub-package (its modules ordered by its own LAYERS) or top-level modules, bottom up."""

    name: str
    summary: str
    package: str = ""
    """The sub-package this layer is; "" for top-level modules."""
    modules: tuple[tuple[str, ...], ...] = ()
    """Top-level modules in sub-layers, bottom up ("" is this package's __init__); empty for a sub-package."""

    def folder(self) -> str:
        """How the README and this docstring name the layer: a sub-package's folder, or the layer's name."""
        return f"{self.package}/" if self.package else self.name


LAYERS: tuple[Layer, ...] = (
    Layer("foundation", "errors a user can act on, progress callbacks, settings validation, the atomic workspace store, "
          "the Task extension point, models, data sources, consent to import a run's code",
          modules=(("errors", "progress", "distributed", "scores"), ("validation", "store", "task", "models", "annotations"),
                   ("data", "trust"))),
    Layer("numerics", "the math the methods share: per-layer gradients, projections, curvature, segments, the inputs every "
          "method receives", package="numerics"),
    Layer("runs", "how a run is made and kept: its record, training, the Recorder, import, the demo, the replay engine",
          package="runs"),
    Layer("methods", "one module per attribution method, each a `Method` subclass declaring what it is", package="methods"),
    Layer("front door", "where attribute / prepare / self_influence store what they compute and keep fitted states loaded, "
          "the calls themselves, what the model sees (probabilities, map, representations), exports",
          modules=(("artifacts", "state_cache"), ("api",), ("inspection", "exports"))),
    Layer("evaluation", "LDS, counterfactual and smoothness checks, mislabel rankings and training dynamics", package="evaluation"),
    Layer("cleaning", "from flags to a better model: the cleaning plan, its predicted effect, the run retrained with it beside a "
          "random control, the cleaned data's exports", package="cleaning"),
    Layer("jobs", "long work as background jobs: the queue, what each kind computes, the workers", package="jobs"),
    Layer("entry points", "the `tdx` command, old import paths, this front door", modules=(("cli", "run", "recorder", ""),)),
)
"""The core's layers, bottom up: a module imports only from layers below its own (or lower sub-layers of its own)."""


def layer_lines() -> list[str]:
    """One line per layer, as this docstring and the README's Layout section list them (a test checks both)."""
    lines = []
    for layer in LAYERS:
        modules = [module or "the package" for sublayer in layer.modules for module in sublayer]
        named = f" ({', '.join(modules)})" if modules else ""
        lines.append(f"- {layer.folder()}{named}: {layer.summary}")
    return lines


_EXPORTS = {
    "load_run": "runs.run", "list_runs": "runs.run", "Run": "runs.run", "Recipe": "runs.run", "Stage": "runs.run",
    "CheckpointPolicy": "runs.run",
    "train": "runs.training", "retrain": "runs.training", "record_run": "runs.training", "TrainingSession": "runs.session",
    "Recorder": "runs.recorder", "RecorderSettings": "runs.recorder", "ArrayData": "runs.recorder",
    "list_incomplete": "runs.recorder",
    "import_run": "runs.importing",
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
