"""The actual effect of a cleaning plan: the run retrained with the plan applied, beside a random control of the same size.

For each seed, three models are compared on the test set (margins and predicted classes): the run
retrained as it was (base), with the plan applied (cleaned: `retrain(run, keep, labels=...)`), and
with the control applied (as many random examples given random other classes, and as many random
examples removed, as the plan relabels and removes). The same seeds for all three, so what cleaning
does reads apart from what any retraining does: the base's spread over seeds is the retraining
noise, and the control is what changing that many examples at random does. Seed offset 0 is the
run's own seed, whose base is the run itself (retrain reproduces it bit for bit).

The cleaned data is also kept as a new run of the workspace, <run>-cleaned-<plan key>, trained by
the run's own training function on the cleaned data stored with it (ArrayData, examples keeping
their ids), so every page opens it. It is trained on the cleaned rows only, so its batches differ
from the cleaned retrain's (which draws the kept rows of the full index range): the numbers come
from the retrains, the run is for looking.

Each retrain's outcome is stored as it finishes, under runs/<id>/retrained/<key>/ keyed by what it changes
and its seed (a stopped experiment resumes where it was, and plans share their base retrains); the
experiment's result under runs/<id>/cleaning/<key>/ at the end.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import SettingsError
from ..progress import ProgressFn, no_progress
from ..runs.recorder import ArrayData, RecorderSettings
from ..runs.run import RECIPE_FUNCTION, Run, load_run
from ..runs.threads import one_thread
from ..runs.training import record_run, retrain, why_not_retrainable
from ..store import Artifact, atomic_save_npy, atomic_write_json, load_npy, read_json
from ..task import Task
from ..validation import check_settings
from .plan import CleaningPlan, PlanEntry, plan_arrays, store_plan
from .predict import PredictedEffect, final_outcomes, per_class, test_outcomes

KINDS = ("base", "cleaned", "control")
"""The models of each seed: the run as it was, with the plan applied, with the control applied."""


@dataclass(frozen=True)
class ExperimentSettings:
    """Which seeds retrain, how the control is drawn, and whether the cleaned data becomes a run."""

    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": (
        "retraining seed offsets from the run's seed (0: the run's own, whose base is the run itself); each offset costs three trainings "
        "(two for 0)")})
    control_seed: int = field(default=0, metadata={"help": "numpy seed of the control's random examples and classes"})
    keep_run: bool = field(default=True, metadata={"help": (
        "also record the cleaned data as a new run, <run>-cleaned-<plan key>, that every page opens")})

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))
        check_settings(self, seeds=len(self.seeds) >= 1 and min(self.seeds) >= 0 and len(set(self.seeds)) == len(self.seeds),
                       control_seed=self.control_seed >= 0)


def random_plan(run: Run, relabels: int, removals: int, seed: int, *, origin: str = "random") -> CleaningPlan:
    """`relabels` random examples given random other classes and `removals` other random examples removed (numpy seed `seed`)."""
    train_set, _ = run.datasets()
    generator = np.random.default_rng(seed)
    chosen = generator.choice(len(train_set), size=relabels + removals, replace=False)
    relabelled, removed = chosen[:relabels], chosen[relabels:]
    labels = (train_set.y.numpy()[relabelled] + generator.integers(1, train_set.n_classes, size=relabels)) % train_set.n_classes
    entries = [PlanEntry(int(train_set.ids[index]), "relabel", int(label), origin) for index, label in zip(relabelled, labels)]
    entries += [PlanEntry(int(train_set.ids[index]), "remove", None, origin) for index in removed]
    return CleaningPlan(run.run_id, tuple(sorted(entries, key=lambda entry: entry.example_id)),
                        f"{relabels} random relabels, {removals} random removals")


def control_plan(run: Run, plan: CleaningPlan, seed: int) -> CleaningPlan:
    """The plan's control: as many random examples given random other classes as it relabels, as many others removed as it removes."""
    counts = plan.counts()
    return random_plan(run, counts["relabel"], counts["remove"], seed, origin="control")


def cleaned_run_id(run: Run, plan: CleaningPlan) -> str:
    """The id of the run the cleaned data is kept as: what it is, and which plan."""
    return f"{run.run_id}-cleaned-{plan.key()[:8]}"


@dataclass
class ExperimentResult:
    """The test set under each kind of model, per seed.

    margins / predicted: kind (KINDS) -> (n_seeds, n_test) correct-class margins / predicted classes;
    labels: (n_test,) the true classes; cleaned_run: the id of the cleaned data's run ("" if not kept).
    """

    plan_key: str
    control_key: str
    seeds: list[int]
    labels: np.ndarray
    n_classes: int
    margins: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]
    cleaned_run: str = ""
    seconds: float = 0.0

    def correct(self, kind: str) -> np.ndarray:
        """(n_seeds, n_test) whether each seed's model of the kind is right."""
        return self.predicted[kind] == self.labels[None]

    def accuracy(self, kind: str) -> np.ndarray:
        """(n_seeds,) test accuracy of the kind's models."""
        return self.correct(kind).mean(axis=1)

    def accuracy_change(self, kind: str) -> np.ndarray:
        """(n_seeds,) test accuracy of the kind's model minus the base model's of the same seed."""
        return self.accuracy(kind) - self.accuracy("base")

    def class_accuracy(self, kind: str) -> np.ndarray:
        """(n_classes,) per-class test accuracy of the kind's models, averaged over the seeds."""
        return np.mean([per_class(correct, self.labels, self.n_classes) for correct in self.correct(kind)], axis=0)

    def margin_change(self, kind: str) -> np.ndarray:
        """(n_test,) each test margin's change from the base model to the kind's, averaged over the seeds."""
        return (self.margins[kind] - self.margins["base"]).mean(axis=0)

    def flipped(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(to right, to wrong): test indices whose correctness changed from the base model in most seeds."""
        before, after = self.correct("base"), self.correct(kind)
        majority = len(self.seeds) / 2
        return (np.flatnonzero((~before & after).sum(axis=0) > majority), np.flatnonzero((before & ~after).sum(axis=0) > majority))


def _artifact(run: Run, plan: CleaningPlan, settings: ExperimentSettings, task: Task) -> Artifact:
    return run.artifact("cleaning", plan=plan.key(), seeds=list(settings.seeds), control_seed=settings.control_seed,
                        keep_run=settings.keep_run, task=task.key())


def stored_experiment(run: Run, plan: CleaningPlan, settings: ExperimentSettings = ExperimentSettings(), *,
                      task: Task | None = None) -> ExperimentResult | None:
    """The experiment `clean_and_retrain` would return when it is stored, else None (nothing is retrained)."""
    artifact = _artifact(run, plan, settings, task or Task())
    return _load(artifact) if artifact.is_complete() else None


def _load(artifact: Artifact) -> ExperimentResult:
    summary = read_json(artifact.path("result.json"))
    outcomes = {kind: load_npy(artifact.path(f"{kind}.npy")) for kind in KINDS}  # (n_seeds, 2, n_test): margins, classes
    return ExperimentResult(
        plan_key=summary["plan_key"], control_key=summary["control_key"], seeds=summary["seeds"],
        labels=load_npy(artifact.path("labels.npy")),
        n_classes=summary["n_classes"], margins={kind: values[:, 0] for kind, values in outcomes.items()},
        predicted={kind: values[:, 1].astype(np.int64) for kind, values in outcomes.items()}, cleaned_run=summary["cleaned_run"],
        seconds=summary["seconds"])


def retrained_outcomes(run: Run, keep: np.ndarray | None, labels: np.ndarray | None, seed: int, *, task: Task) -> np.ndarray:
    """(2, n_test) test margins and classes of the run retrained on keep (N,) / labels (N,) with a seed offset, stored once.

    Keyed by what the retrain changes (the rows it removes and relabels, and how) and the seed, so
    experiments that share a retrain share it: the base of every plan, a plan asked with more seeds.
    """
    train_set, test_set = run.datasets()
    keep = np.ones(len(train_set), dtype=bool) if keep is None else keep
    labels = train_set.y.numpy() if labels is None else labels
    changed = np.flatnonzero(labels != train_set.y.numpy())
    artifact = run.artifact("retrained", removed=np.flatnonzero(~keep).tolist(), relabelled=changed.tolist(),
                            labels=labels[changed].tolist(), seed=seed, task=task.key())

    def compute(stored: Artifact) -> None:
        with one_thread():  # see threads.one_thread: small models retrain faster on one thread
            model = retrain(run, keep, labels=labels, seed=run.recipe.seed + seed, task=task)
        atomic_save_npy(stored.path("outcomes.npy"), np.stack(test_outcomes(model, test_set, task)).astype(np.float64))

    return load_npy(artifact.compute_once(compute).path("outcomes.npy"))


def keep_cleaned_run(run: Run, plan: CleaningPlan, *, progress: ProgressFn = no_progress) -> Run:
    """The cleaned data as a new run of the workspace (trained once by the run's own function; reused when it exists)."""
    run_id = cleaned_run_id(run, plan)
    if run_id in run.workspace.run_ids():
        return load_run(run.workspace, run_id)
    keep, labels = plan_arrays(run, plan)
    train_set, test_set = run.datasets()
    rows = torch.from_numpy(np.flatnonzero(keep))
    data = ArrayData(train_set.x[rows], labels[keep], test_set.x, test_set.y, class_names=train_set.class_names,
                     ids_train=train_set.ids[keep], ids_test=test_set.ids)
    trained_by = run.training_function()
    recipe = run.recipe if trained_by.function == RECIPE_FUNCTION else None
    with one_thread():
        return record_run(run.workspace, run_id, trained_by.function, data=data, model=run.model, options=trained_by.options,
                          seed=run.recipe.seed, recipe=recipe, progress=progress,
                          settings=RecorderSettings(margins_from_losses=True, overwrite=True))


def clean_and_retrain(run: Run, plan: CleaningPlan, settings: ExperimentSettings = ExperimentSettings(), *,
                      task: Task | None = None, progress: ProgressFn = no_progress) -> ExperimentResult:
    """Retrain the run as it was, with the plan and with a control, for every seed; keep the cleaned data as a run. Resumes."""
    reason = why_not_retrainable(run)
    if reason is not None:
        raise SettingsError(reason)
    task = task or Task()
    artifact = _artifact(run, plan, settings, task)
    if artifact.is_complete():
        return _load(artifact)
    started = time.perf_counter()
    store_plan(run, plan)
    control = control_plan(run, plan, settings.control_seed)
    applied = {"base": (None, None), "cleaned": plan_arrays(run, plan), "control": plan_arrays(run, control)}
    final = np.stack(final_outcomes(run, task)).astype(np.float64)
    jobs = [(kind, seed) for seed in settings.seeds for kind in KINDS if (kind, seed) != ("base", 0)]
    total = len(jobs) + settings.keep_run
    outcomes: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    for seed in settings.seeds:
        for kind in KINDS:
            if (kind, seed) == ("base", 0):  # the run's own seed with nothing changed is the run itself
                outcomes[kind].append(final)
                continue
            outcomes[kind].append(retrained_outcomes(run, *applied[kind], seed, task=task))
            progress(jobs.index((kind, seed)) + 1, total)
    cleaned = keep_cleaned_run(run, plan).run_id if settings.keep_run else ""
    progress(total, total)
    _, test_set = run.datasets()

    def write(stored: Artifact) -> None:
        for kind, values in outcomes.items():
            atomic_save_npy(stored.path(f"{kind}.npy"), np.stack(values))
        atomic_save_npy(stored.path("labels.npy"), test_set.y.numpy())
        atomic_write_json(stored.path("result.json"), {"plan_key": plan.key(), "control_key": store_plan(run, control),
                                                       "seeds": list(settings.seeds), "n_classes": test_set.n_classes,
                                                       "cleaned_run": cleaned, "seconds": time.perf_counter() - started})

    return _load(artifact.compute_once(write))


@dataclass(frozen=True)
class Comparison:
    """Predicted against actual: margins (Spearman over the test set), accuracy, and flips (how many of each were observed)."""

    spearman: float
    predicted_accuracy_change: float
    accuracy_change: float
    accuracy_change_std: float
    control_accuracy_change: float
    predicted_flips: int
    observed_flips: int
    flips_both: int

    def as_dict(self) -> dict[str, float]:
        """The comparison as plain numbers (a table row)."""
        return asdict(self)


def compare(predicted: PredictedEffect, actual: ExperimentResult) -> Comparison:
    """How the prediction fared: per-query margin change (Spearman against the seeds' mean change), accuracy change, flips."""
    from scipy.stats import spearmanr  # imported on use: scipy.stats takes a second to import

    before, after = predicted.accuracy()
    predicted_flips = set(predicted.to_right.tolist()) | set(predicted.to_wrong.tolist())
    observed = actual.flipped("cleaned")
    observed_flips = set(observed[0].tolist()) | set(observed[1].tolist())
    change = actual.accuracy_change("cleaned")
    return Comparison(
        spearman=float(spearmanr(predicted.change, actual.margin_change("cleaned")).statistic),
        predicted_accuracy_change=after - before, accuracy_change=float(change.mean()), accuracy_change_std=float(change.std()),
        control_accuracy_change=float(actual.accuracy_change("control").mean()),
        predicted_flips=len(predicted_flips), observed_flips=len(observed_flips), flips_both=len(predicted_flips & observed_flips))
