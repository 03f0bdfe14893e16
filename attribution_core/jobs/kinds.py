"""What each kind of job computes, and how its stored result is read back without computing anything.

A kind is a pair of plain core calls over JSON parameters: `run` computes and stores (the core's
own atomic, resumable artifacts), `load` returns the stored result or None. A page asks `load`
first and submits a job only on None, so a result is computed once, whoever asked and whenever.
Parameters hold the default Task only (the app's): custom tasks are for the API, which calls the
core directly.

Adding a job kind: its `run` and `load` functions, one `JobKind(...)` in KINDS (its name, the two
functions, the hint a page shows while it runs, whether it is resumable or makes a new run), and a
`<kind>_job(run, ...) -> JobSpec` builder for the callers; then its test. Nothing else: the workers
(worker.py), `tdx jobs` and the app's progress panels (app/components/jobs.py) read KINDS, and
tests/test_extensions.py declares a kind and checks that they do. A renamed kind keeps its former
name in FORMER_NAMES, since jobs.sqlite stores kinds by name.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..api import attribute as attribute_scores
from ..api import prepare, resolve_device, stored_scores
from ..artifacts import state_artifact
from ..cleaning.experiment import ExperimentSettings, clean_and_retrain, stored_experiment
from ..cleaning.plan import load_plan
from ..cleaning.predict import predict_effect, stored_prediction
from ..data import DataSpec
from ..errors import SettingsError
from ..evaluation.counterfactual import CounterfactualSettings, counterfactual, stored_counterfactual
from ..evaluation.lds import LdsSettings, groundtruth, load_groundtruth
from ..evaluation.mislabel import rank_mislabels, ranking_label, stored_ranking
from ..evaluation.smoothness import smoothness, stored_smoothness
from ..inspection import map_layout, representation_index, stored_map_layout, stored_representation_index
from ..methods import method_class
from ..models import ModelSpec
from ..progress import ProgressFn
from ..runs.run import Recipe, Run, load_run
from ..runs.training import train
from ..store import Workspace, check_name
from ..task import Task
from .queue import INTERACTIVE, REQUESTED, JobSpec

Params = Mapping[str, Any]


@dataclass(frozen=True)
class JobKind:
    """One kind of job: how it runs, how its result is loaded, and whether it may pause for more urgent work.

    `run` and `load` take the job's run, or the workspace for a kind that makes the run (new_run).
    """

    name: str
    run: Callable[[Any, Params, ProgressFn], None]
    load: Callable[[Any, Params], Any]
    hint: str
    """What to know while a job of this kind runs, shown under its progress bar on a page."""
    resumable: bool = False
    """True when the computation keeps its finished parts (a ground truth model by model): the worker may then stop it
    between progress reports to run a more urgent job first, and it continues where it stopped."""
    new_run: bool = False
    """True for the kind that trains the run it names: it gets the workspace, and the run's ready jobs follow it."""


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


def _representations(run: Run, params: Params, progress: ProgressFn) -> None:
    representation_index(run, int(params["checkpoint"]), progress=progress)


def _smoothness(run: Run, params: Params, progress: ProgressFn) -> None:
    smoothness(run, int(params["query"]), params["method"], checkpoints=list(params["checkpoints"]), progress=progress)


def _smoothness_stored(run: Run, params: Params):
    return stored_smoothness(run, int(params["query"]), params["method"], checkpoints=list(params["checkpoints"]))


def _ranking(run: Run, params: Params, progress: ProgressFn) -> None:
    rank_mislabels(run, params["ranking"], progress=progress)


def _train(workspace: Workspace, params: Params, progress: ProgressFn) -> None:
    train(DataSpec(**params["data"]), ModelSpec(**params["model"]), Recipe.from_dict(params["recipe"]), workspace, params["run_id"],
          device=resolve_device("auto"), progress=progress)


def _trained(workspace: Workspace, params: Params) -> Run | None:
    return load_run(workspace, params["run_id"]) if params["run_id"] in workspace.run_ids() else None


def _predict_cleaning(run: Run, params: Params, progress: ProgressFn) -> None:
    predict_effect(run, load_plan(run, params["plan"]), params["method"], device=resolve_device("auto"), progress=progress)


def _clean(run: Run, params: Params, progress: ProgressFn) -> None:
    clean_and_retrain(run, load_plan(run, params["plan"]), ExperimentSettings(**params["settings"]), progress=progress)


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("fit", _fit, _fitted, "The fit is done once per run, method and checkpoints; every query after it is quick."),
    JobKind("scores", _score, _scored,
            "Scores are stored per block of test samples: the neighbours of this sample open at once afterwards."),
    JobKind("groundtruth", _groundtruth, lambda run, params: load_groundtruth(run, _lds_settings(params)),
            "Fewer subsets are faster. Every finished retraining is kept: cancelling and starting again loses nothing.",
            resumable=True),
    JobKind("counterfactual", _counterfactual, _counterfactual_stored,
            "Each removal is one retraining of the whole run. Finished retrainings are kept if you cancel.", resumable=True),
    JobKind("layout", _layout, lambda run, params: stored_map_layout(run, int(params["checkpoint"])),
            "The map is laid out once per run and checkpoint, then stored."),
    JobKind("representations", _representations, lambda run, params: stored_representation_index(run, int(params["checkpoint"])),
            "The training set's representations are computed once per run and checkpoint; every lookup after them is instant."),
    JobKind("smoothness", _smoothness, _smoothness_stored, "Each removal is one replay of the recorded run."),
    JobKind("ranking", _ranking, lambda run, params: stored_ranking(run, params["ranking"]),
            "A ranking is computed once per run, then stored."),
    JobKind("train", _train, _trained, "Training runs in the background; the run appears in the list when it is done.",
            new_run=True),
    JobKind("cleaning_prediction", _predict_cleaning,
            lambda run, params: stored_prediction(run, load_plan(run, params["plan"]), params["method"]),
            "The test set's scores are stored once per run and method; a plan that relabels fits the method once more with its "
            "labels. Editing a relabel into a removal costs nothing after that."),
    JobKind("cleaning_experiment", _clean,
            lambda run, params: stored_experiment(run, load_plan(run, params["plan"]), ExperimentSettings(**params["settings"])),
            "Each seed retrains the run as it was, with the plan and with a random control. Finished retrains are kept if you cancel.",
            resumable=True),
)}
"""Every kind of job by name."""

FORMER_NAMES: dict[str, str] = {"features": "representations"}
"""A kind's name before it was renamed -> its name now: jobs.sqlite keeps a job's kind by name, and a job queued under the
former name runs (and loads) as the kind it was."""


def find_kind(name: str) -> JobKind | None:
    """The kind of a name (a former name too), or None when there is none (a job queued by another version of tdx)."""
    return KINDS.get(FORMER_NAMES.get(name, name))


def job_kind(name: str) -> JobKind:
    """The kind of a name (a former name too), or a SettingsError listing the kinds there are."""
    kind = find_kind(name)
    if kind is None:
        raise SettingsError(f"unknown job kind {name!r} (queued by another version of tdx?); kinds: {', '.join(KINDS)}")
    return kind


def load_result(target: Run | Workspace, spec: JobSpec) -> Any:
    """The stored result of a job's work, or None when it is not stored (yet); target: the job's run (the workspace for a new run)."""
    return job_kind(spec.kind).load(target, spec.params)


def _spec(run: Run, kind: str, params: dict[str, Any], title: str, priority: int) -> JobSpec:
    return JobSpec(job_kind(kind).name, run.run_id, run.created, params, title, priority)


def _resolved(run: Run, method: str, checkpoints: list[int] | None) -> list[int]:
    """The checkpoints a method uses, spelled out (None: its default), so that the same work always has the same job key."""
    return run.resolve_checkpoints(None if checkpoints is None else [int(index) for index in checkpoints],
                                   method_class(method).default_checkpoints(len(run.checkpoints)))


def fit_job(run: Run, method: str, checkpoints: list[int] | None = None, *, priority: int = INTERACTIVE) -> JobSpec:
    """Fit a method's train-side state (projected gradients, curvature) on the run."""
    label = method_class(method).label
    return _spec(run, "fit", {"method": method, "checkpoints": _resolved(run, method, checkpoints)},
                 f"{label}: fit on the training set", priority)


def scores_job(run: Run, method: str, queries: list[int], checkpoints: list[int] | None = None, *,
               priority: int = INTERACTIVE) -> JobSpec:
    """Score test samples (a block) against the training set with a method (fitting it first when it is not)."""
    params = {"method": method, "queries": [int(q) for q in queries], "checkpoints": _resolved(run, method, checkpoints)}
    label = method_class(method).label
    span = f"test sample {queries[0]}" if len(queries) == 1 else f"test samples {queries[0]}–{queries[-1]}"
    return _spec(run, "scores", params, f"{label}: scoring {span} against the training set", priority)


def groundtruth_job(run: Run, settings: LdsSettings, *, priority: int = REQUESTED) -> JobSpec:
    """An LDS ground truth: the run retrained (or replayed) on random subsets."""
    what = "retraining on" if settings.mode == "reshuffled" else "replaying with"
    return _spec(run, "groundtruth", {"settings": _settings_dict(settings)},
                 f"LDS ground truth: {what} {settings.n_subsets} random subsets", priority)


def counterfactual_job(run: Run, query: int, method: str, checkpoints: list[int] | None, settings: CounterfactualSettings, *,
                       priority: int = REQUESTED) -> JobSpec:
    """The counterfactual check of one test sample: remove its top proponents, retrain, measure."""
    return _spec(run, "counterfactual", {"query": int(query), "method": method, "checkpoints": _resolved(run, method, checkpoints),
                                         "settings": _settings_dict(settings)},
                 f"Counterfactual check of test sample {query}: retraining without its top proponents", priority)


def smoothness_job(run: Run, query: int, method: str, checkpoints: list[int] | None, *, priority: int = REQUESTED) -> JobSpec:
    """The smoothness check of one test sample's scores: a few random 1 % removals replayed, predicted against actual."""
    return _spec(run, "smoothness", {"query": int(query), "method": method, "checkpoints": _resolved(run, method, checkpoints)},
                 f"Smoothness check of test sample {query}: replaying random removals", priority)


def layout_job(run: Run, checkpoint: int, *, priority: int = INTERACTIVE) -> JobSpec:
    """The Map's 2-D layout of a checkpoint."""
    index = run.checkpoint_index(checkpoint)
    return _spec(run, "layout", {"checkpoint": index}, f"Map: laying out checkpoint {index} (UMAP)", priority)


def representations_job(run: Run, checkpoint: int, *, priority: int = INTERACTIVE) -> JobSpec:
    """The unit-length penultimate-layer representations of a checkpoint that find-similar compares."""
    index = run.checkpoint_index(checkpoint)
    return _spec(run, "representations", {"checkpoint": index}, f"Find similar: representations of checkpoint {index}", priority)


def ranking_job(run: Run, ranking: str, *, priority: int = INTERACTIVE) -> JobSpec:
    """A mislabel ranking of the training set."""
    return _spec(run, "ranking", {"ranking": ranking}, f"Mislabels: ranking the training set by {ranking_label(ranking)}", priority)


def train_job(workspace: Workspace, run_id: str, data: DataSpec, model: ModelSpec, recipe: Recipe, *,
              priority: int = REQUESTED) -> JobSpec:
    """Train a new run (then queue its ready jobs)."""
    check_name(run_id, "run id")
    params = {"run_id": run_id, "data": dataclasses.asdict(data), "model": dataclasses.asdict(model), "recipe": dataclasses.asdict(recipe)}
    return JobSpec("train", run_id, "", json.loads(json.dumps(params)), f"Training run {run_id}", priority)


def cleaning_prediction_job(run: Run, plan_key: str, method: str, *, priority: int = INTERACTIVE) -> JobSpec:
    """A cleaning plan's predicted effect: the method's scores of the whole test set, with the plan's labels too where it relabels."""
    label = method_class(method).label
    return _spec(run, "cleaning_prediction", {"plan": plan_key, "method": method},
                 f"{label}: scoring the test set for cleaning plan {plan_key[:8]}", priority)


def cleaning_experiment_job(run: Run, plan_key: str, settings: ExperimentSettings, *, priority: int = REQUESTED) -> JobSpec:
    """A cleaning plan's actual effect: the run retrained with it and with a random control, over seeds; the cleaned run kept."""
    return _spec(run, "cleaning_experiment", {"plan": plan_key, "settings": _settings_dict(settings)},
                 f"Cleaning plan {plan_key[:8]}: retraining with it and with a random control ({len(settings.seeds)} seeds)", priority)


def _settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready parameters (tuples as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(settings).items()}

