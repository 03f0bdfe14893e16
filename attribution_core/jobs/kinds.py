"""What each kind of job computes, and how its stored result is read back without computing anything.

A kind is a pair of plain core calls over JSON parameters: `run` computes and stores (the core's
own atomic, resumable artifacts), `load` returns the stored result or None. A page asks `load`
first and submits a job only on None, so a result is computed once, whoever asked and whenever.
Parameters hold the default Task only (the app's): custom tasks are for the API, which calls the
core directly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..api import attribute as attribute_scores
from ..api import prepare, state_artifact, stored_scores
from ..errors import SettingsError
from ..evaluation.counterfactual import CounterfactualSettings, counterfactual, stored_counterfactual
from ..evaluation.lds import LdsSettings, groundtruth, load_groundtruth
from ..evaluation.mislabel import rank_mislabels, stored_ranking
from ..inspection import map_layout, stored_map_layout
from ..methods import method_class
from ..progress import ProgressFn
from ..run import Run
from ..task import Task
from .queue import INTERACTIVE, REQUESTED, JobSpec

Params = Mapping[str, Any]


@dataclass(frozen=True)
class JobKind:
    """One kind of job: how it runs, how its result is loaded, and whether it may pause for more urgent work."""

    name: str
    run: Callable[[Run, Params, ProgressFn], None]
    load: Callable[[Run, Params], Any]
    resumable: bool = False
    """True when the computation keeps its finished parts (a ground truth model by model): the worker may then stop it
    between progress reports to run a more urgent job first, and it continues where it stopped."""


def _checkpoints(params: Params) -> list[int] | None:
    value = params.get("checkpoints")
    return None if value is None else [int(index) for index in value]


def _fit(run: Run, params: Params, progress: ProgressFn) -> None:
    prepare(run, params["method"], checkpoints=_checkpoints(params), settings=params.get("settings"), progress=progress)


def _fitted(run: Run, params: Params) -> bool | None:
    method = method_class(params["method"])(params.get("settings"))
    checkpoints = run.resolve_checkpoints(_checkpoints(params), method.default_checkpoints(len(run.checkpoints)))
    return True if state_artifact(run, method, checkpoints, Task()).is_complete() else None


def _score(run: Run, params: Params, progress: ProgressFn) -> None:
    attribute_scores(run, params["method"], queries=list(params["queries"]), checkpoints=_checkpoints(params),
                     settings=params.get("settings"), progress=progress)


def _scored(run: Run, params: Params):
    return stored_scores(run, params["method"], queries=list(params["queries"]), checkpoints=_checkpoints(params),
                         settings=params.get("settings"))


def _lds_settings(params: Params) -> LdsSettings:
    return LdsSettings(**params["settings"])


def _groundtruth(run: Run, params: Params, progress: ProgressFn) -> None:
    groundtruth(run, _lds_settings(params), progress=progress)


def _counterfactual_settings(params: Params) -> CounterfactualSettings:
    return CounterfactualSettings(**params.get("settings", {}))


def _counterfactual(run: Run, params: Params, progress: ProgressFn) -> None:
    counterfactual(run, int(params["query"]), params["method"], settings=_counterfactual_settings(params),
                   checkpoints=_checkpoints(params), progress=progress)


def _counterfactual_stored(run: Run, params: Params):
    return stored_counterfactual(run, int(params["query"]), params["method"], settings=_counterfactual_settings(params),
                                 checkpoints=_checkpoints(params))


def _layout(run: Run, params: Params, progress: ProgressFn) -> None:
    map_layout(run, int(params["checkpoint"]), progress=progress)


def _ranking(run: Run, params: Params, progress: ProgressFn) -> None:
    rank_mislabels(run, params["ranking"], progress=progress)


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("fit", _fit, _fitted),
    JobKind("scores", _score, _scored),
    JobKind("groundtruth", _groundtruth, lambda run, params: load_groundtruth(run, _lds_settings(params)), resumable=True),
    JobKind("counterfactual", _counterfactual, _counterfactual_stored, resumable=True),
    JobKind("layout", _layout, lambda run, params: stored_map_layout(run, int(params["checkpoint"]))),
    JobKind("ranking", _ranking, lambda run, params: stored_ranking(run, params["ranking"])),
)}
"""Every kind of job by name."""


def job_kind(name: str) -> JobKind:
    """The kind of a name, or a SettingsError listing the kinds there are."""
    if name not in KINDS:
        raise SettingsError(f"unknown job kind {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name]


def load_result(run: Run, spec: JobSpec) -> Any:
    """The stored result of a job's work, or None when it is not stored (yet)."""
    return job_kind(spec.kind).load(run, spec.params)


def _spec(run: Run, kind: str, params: dict[str, Any], title: str, priority: int) -> JobSpec:
    return JobSpec(kind, run.run_id, run.created, params, title, priority)


def fit_job(run: Run, method: str, checkpoints: list[int] | None = None, *, priority: int = INTERACTIVE) -> JobSpec:
    """Fit a method's train-side state (features, curvature) on the run."""
    label = method_class(method).label
    return _spec(run, "fit", {"method": method, "checkpoints": checkpoints}, f"{label}: fit on the training set", priority)


def scores_job(run: Run, method: str, queries: list[int], checkpoints: list[int] | None = None, *,
               priority: int = INTERACTIVE) -> JobSpec:
    """Score test samples (a block) against the training set with a method."""
    label = method_class(method).label
    span = f"test sample {queries[0]}" if len(queries) == 1 else f"test samples {queries[0]}–{queries[-1]}"
    return _spec(run, "scores", {"method": method, "queries": [int(q) for q in queries], "checkpoints": checkpoints},
                 f"{label}: scoring {span}", priority)


def groundtruth_job(run: Run, settings: LdsSettings, *, priority: int = REQUESTED) -> JobSpec:
    """An LDS ground truth: the run retrained (or replayed) on random subsets."""
    what = "retraining on" if settings.mode == "reshuffled" else "replaying with"
    return _spec(run, "groundtruth", {"settings": _settings_dict(settings)},
                 f"LDS ground truth: {what} {settings.n_subsets} random subsets", priority)


def counterfactual_job(run: Run, query: int, method: str, checkpoints: list[int] | None, settings: CounterfactualSettings, *,
                       priority: int = REQUESTED) -> JobSpec:
    """The counterfactual check of one test sample: remove its top proponents, retrain, measure."""
    return _spec(run, "counterfactual", {"query": int(query), "method": method, "checkpoints": checkpoints,
                                         "settings": _settings_dict(settings)},
                 f"Counterfactual check of test sample {query}: retraining without its top proponents", priority)


def layout_job(run: Run, checkpoint: int, *, priority: int = INTERACTIVE) -> JobSpec:
    """The Map's 2-D layout of a checkpoint."""
    index = checkpoint + len(run.checkpoints) if checkpoint < 0 else checkpoint
    return _spec(run, "layout", {"checkpoint": index}, f"Map: laying out checkpoint {index} (UMAP)", priority)


def ranking_job(run: Run, ranking: str, *, priority: int = INTERACTIVE) -> JobSpec:
    """A mislabel ranking of the training set."""
    return _spec(run, "ranking", {"ranking": ranking}, f"Mislabels: ranking the training set by {ranking}", priority)


def _settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready parameters (tuples as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(settings).items()}

