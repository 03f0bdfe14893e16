"""The predicted effect of a cleaning plan on every test margin, before any retraining.

For a method that estimates removals, τ(q, i) ≈ f_q(trained with z_i) − f_q(without it), f_q the
query's correct-class margin (api.py; tests/test_score_units.py). To first order the effects of the
plan's changes add up:
- removing z_i changes f_q by −τ(q, i);
- relabelling z_i = (x_i, y_i) to y'_i is removing it and adding (x_i, y'_i), whose score is
  τ'(q, (x_i, y'_i)): the same method fitted on the same checkpoints with the relabelled training
  labels (`relabelled_view`), so the change is τ'(q, (x_i, y'_i)) − τ(q, (x_i, y_i)).
So Δf_q = Σ_removed −τ(q, i) + Σ_relabelled [τ'(q, (x_i, y'_i)) − τ(q, (x_i, y_i))].

Why the relabelled fit is the right τ' for each method: influence (exact, EK-FAC, K-FAC) scores are
−(1/N) ∇f_qᵀ (G + λI)⁻¹ ∇L(z) with a curvature G (Gauss–Newton, or the true Fisher's sampled
labels) that does not read the training labels, so the refit has the same G and τ' is exactly the
first-order term of swapping L(x_i, y_i) for L(x_i, y'_i) in the training loss (checked against
exact relabel-one-out retraining in tests/test_cleaning.py). SOURCE's segment curvatures are the
same true-Fisher EK-FAC and its segment gradients ḡ(z) read the label, with the draw weights of the
record: the relabelled example is drawn where z_i was. TRAK's kernel ΦᵀΦ is built from
label-dependent margin gradients, so the refit also moves the kernel by the plan's rows, a change
of second order (O(plan / N) times an O(1/N) score). Replay differentiates the recorded training,
which trained on the given labels: it predicts removals only. Methods that do not estimate removals
(TracIn, gradient similarities) have no unit to add up and are refused.

What is stored (job `cleaning_prediction`, one per plan and method): the method's scores of the
whole test set (api.attribute, reused by every plan), the relabelled fit's scores (keyed by the
relabelled labels, so plans that relabel alike share it), and the final model's test margins.
`stored_prediction` then combines them for a plan in well under a second; so a plan edited from
relabel to remove (or back to keep) costs nothing more, and a new relabel one fit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..api import attribute, resolve_device, stored_scores
from ..data import Dataset
from ..errors import PlanError, SettingsError
from ..methods import METHODS, method_class
from ..numerics.inputs import batches
from ..progress import ProgressFn, no_progress
from ..runs.run import Run
from ..runs.training import relabelled
from ..store import Artifact, atomic_save_npy, content_key, load_npy
from ..task import Task
from .plan import CleaningPlan, plan_arrays, plan_indices

DEFAULT_METHOD = "ekfac"
"""The method that predicts unless one is chosen. B9 (benchmarks/RESULTS.md), Spearman of predicted against actual per-query
margin change on the top-10 % plans: EK-FAC 0.86 on the demo's noisy run and 0.55 on the memorising run, SOURCE 0.89 and
0.76 in four to ten times the scoring time, TRAK 0.47 and 0.48. EK-FAC and SOURCE overstate the size of the changes
(4-300 times), TRAK's sizes are right to a factor of 2: predicted accuracy and flips follow the sizes."""


@dataclass
class RelabelledRun(Run):
    """A run's checkpoints with its training labels replaced: what a method fitted "with the relabelled training labels" reads.

    Everything it stores (fits, scores) is keyed by its labels too, beside the run's own results.
    """

    labels_key: str = ""

    def artifact(self, kind: str, **inputs) -> Artifact:
        """The run's artifact of a kind, keyed by the replaced labels as well."""
        return super().artifact(kind, relabelled=self.labels_key, **inputs)


def relabelled_view(run: Run, labels: np.ndarray) -> RelabelledRun:
    """The run seen with training labels `labels` (N,): same checkpoints, record, views and test set."""
    train_set, test_set = run.datasets()
    labels = np.asarray(labels, dtype=np.int64)
    shared = {item.name: getattr(run, item.name) for item in fields(Run) if item.init and item.name != "_datasets"}
    return RelabelledRun(**shared, _datasets=(relabelled(train_set, labels), test_set), labels_key=content_key(labels.tolist()))


def predicting_methods(relabels: bool) -> list[str]:
    """The methods whose scores add up to a predicted effect: those that estimate removals (less replay for a plan that relabels)."""
    return [name for name, method in METHODS.items() if method.estimates_removal and not (relabels and name == "replay")]


def check_predicting_method(method: str, plan: CleaningPlan) -> None:
    """Raise unless the method's scores are a change of the margin (they add up), and fit relabelled labels where the plan relabels."""
    chosen = method_class(method)
    relabels = bool(plan.with_action("relabel"))
    if not chosen.estimates_removal:
        raise SettingsError(f"{chosen.label} scores are similarities, not a change of the margin: they cannot add up to a "
                            f"predicted effect; predict with one of {', '.join(predicting_methods(relabels))}")
    if method not in predicting_methods(relabels):
        raise SettingsError("replay differentiates the recorded training, which trained on the given labels: it predicts "
                            f"removals only; predict a plan that relabels with one of {', '.join(predicting_methods(True))}")


@torch.no_grad()
def test_outcomes(model: torch.nn.Module, test_set: Dataset, task: Task, *, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(margins (n_test,) of the task's measurement, predicted classes (n_test,)) of a model on the test set."""
    model.eval()
    device = next(model.parameters()).device
    margins, predicted = [], []
    for _, x, y in batches(test_set.x, test_set.y, batch_size, device):
        margins.append(task.measurement(model, x, y).float().cpu())
        predicted.append(task.predictions(model, x).argmax(1).cpu())
    return torch.cat(margins).numpy().astype(np.float64), torch.cat(predicted).numpy().astype(np.int64)


def _outcomes_artifact(run: Run, task: Task) -> Artifact:
    return run.artifact("test_outcomes", checkpoint=len(run.checkpoints) - 1, task=task.key())


def final_outcomes(run: Run, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The final model's test margins and predicted classes, computed once and stored."""

    def compute(stored: Artifact) -> None:
        margins, predicted = test_outcomes(run.load_model(-1), run.datasets()[1], task)
        atomic_save_npy(stored.path("margins.npy"), margins)
        atomic_save_npy(stored.path("predicted.npy"), predicted)

    artifact = _outcomes_artifact(run, task).compute_once(compute)
    return load_npy(artifact.path("margins.npy")), load_npy(artifact.path("predicted.npy"))


def margin_change(scores: np.ndarray, removed: np.ndarray, relabelled: np.ndarray, relabelled_scores: np.ndarray | None) -> np.ndarray:
    """Predicted change (Q,) of each query's margin: Σ_removed −τ(q, i) + Σ_relabelled [τ'(q, (x_i, y'_i)) − τ(q, (x_i, y_i))].

    scores: (Q, N) the method's scores with the given labels; relabelled_scores: (Q, N) with the
    plan's labels (only its relabelled columns are read; None when nothing is relabelled);
    removed, relabelled: training indices.
    """
    change = -scores[:, removed].sum(axis=1, dtype=np.float64)
    if len(relabelled):
        change += (relabelled_scores[:, relabelled].astype(np.float64) - scores[:, relabelled]).sum(axis=1)
    return change


@dataclass
class PredictedEffect:
    """A plan's predicted effect on the test set under one method.

    margins: (n_test,) the final model's correct-class margins; change: (n_test,) their predicted
    change; predicted: (n_test,) the final model's classes; labels: (n_test,) the true classes.
    A test sample's correctness is predicted to flip where its margin crosses 0 (a margin above 0
    is a right prediction, and a wrong one is always below 0).
    """

    method: str
    plan_key: str
    margins: np.ndarray
    change: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray
    n_classes: int
    seconds: float = 0.0

    @property
    def correct_before(self) -> np.ndarray:
        """(n_test,) whether the final model is right."""
        return self.predicted == self.labels

    @property
    def correct_after(self) -> np.ndarray:
        """(n_test,) whether the model is predicted to be right after the plan: flipped where the margin crosses 0."""
        after = self.margins + self.change
        crossed = np.sign(after) != np.sign(self.margins)
        return np.where(crossed, after > 0, self.correct_before)

    @property
    def to_right(self) -> np.ndarray:
        """Test indices predicted to go from wrong to right."""
        return np.flatnonzero(~self.correct_before & self.correct_after)

    @property
    def to_wrong(self) -> np.ndarray:
        """Test indices predicted to go from right to wrong."""
        return np.flatnonzero(self.correct_before & ~self.correct_after)

    def accuracy(self) -> tuple[float, float]:
        """(test accuracy now, predicted test accuracy after the plan)."""
        return float(self.correct_before.mean()), float(self.correct_after.mean())

    def class_accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        """Per true class (n_classes,), accuracy now and predicted after (nan for a class the test set lacks)."""
        return per_class(self.correct_before, self.labels, self.n_classes), per_class(self.correct_after, self.labels, self.n_classes)


def per_class(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy (n_classes,) of boolean outcomes (n,) per true class; nan for a class with no sample."""
    counts = np.bincount(labels, minlength=n_classes)
    right = np.bincount(labels, weights=correct.astype(np.float64), minlength=n_classes)
    return np.divide(right, counts, out=np.full(n_classes, np.nan), where=counts > 0)


def _view_for(run: Run, plan: CleaningPlan) -> RelabelledRun | None:
    """The run with the plan's relabels applied to its labels (its removals left in), or None when nothing is relabelled."""
    if not plan.with_action("relabel"):
        return None
    _, labels = plan_arrays(run, plan)
    return relabelled_view(run, labels)


def stored_prediction(run: Run, plan: CleaningPlan, method: str, *, task: Task | None = None) -> PredictedEffect | None:
    """The plan's predicted effect from stored scores (nothing is fitted or scored), or None while any part is missing."""
    started = time.perf_counter()
    check_predicting_method(method, plan)
    plan_arrays(run, plan)  # checks the plan
    task = task or Task()
    if not _outcomes_artifact(run, task).is_complete():
        return None
    scores = stored_scores(run, method, task=task)
    view = _view_for(run, plan)
    view_scores = None if view is None else stored_scores(view, method, task=task)
    if scores is None or (view is not None and view_scores is None):
        return None
    margins, predicted = final_outcomes(run, task)
    change = margin_change(scores.values, plan_indices(run, plan, "remove"), plan_indices(run, plan, "relabel"),
                           None if view_scores is None else view_scores.values)
    _, test_set = run.datasets()
    return PredictedEffect(method, plan.key(), margins, change, predicted, test_set.y.numpy(), test_set.n_classes,
                           time.perf_counter() - started)


def predict_effect(run: Run, plan: CleaningPlan, method: str = DEFAULT_METHOD, *, task: Task | None = None,
                   device: str | torch.device = "auto", progress: ProgressFn = no_progress) -> PredictedEffect:
    """The plan's predicted effect, scoring the whole test set first where it is not stored (a job's work: minutes on a CPU)."""
    check_predicting_method(method, plan)
    task = task or Task()
    view = _view_for(run, plan)
    steps = [run] if view is None else [run, view]
    for number, target in enumerate(steps):
        attribute(target, method, task=task, device=resolve_device(device),
                  progress=lambda done, total, number=number: progress(number * total + done, len(steps) * total))
    final_outcomes(run, task)
    predicted = stored_prediction(run, plan, method, task=task)
    if predicted is None:
        raise PlanError(f"the scores of plan {plan.key()} under {method} were computed but are not stored: is the workspace writable?")
    return predicted
