"""B4: mislabel detection with 10 % of training labels flipped, every ranking side by side.

Two settings on the Fashion-MNIST sample: "demo" (the demo's noisy MLP run, where the model
does not fit most flipped labels and plain loss already works) and "memorising" (a wider MLP
trained without weight decay, cosine-annealed, until it fits every flipped label, where loss fails and the
rankings separate). Reported: the fraction of flipped labels in the top 10 % / 20 % of each
ranking, its ROC-AUC and seconds: the training record's dynamics rankings (no extra training),
cleanlab on 5-fold cross-validated retraining, self-influence and checkpoint losses, with
kronfluence's EK-FAC self-influence beside ours when installed; then issue 18's goal for the
setting, and a reference that knows the flips: the demo's MLP trained on the true labels.

    python benchmarks/b4_mislabel.py [--quick] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from common import ANCHORS_MISSING, anchors_installed, markdown_table, parser, report, timed, workspace_root

from attribution_core.data import DataSpec
from attribution_core.demo import demo_runs
from attribution_core.evaluation.mislabel import fold_masks, mislabel_metrics, rank_mislabels, rankings_for
from attribution_core.inspection import model_probabilities
from attribution_core.models import ModelSpec
from attribution_core.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.store import Workspace
from attribution_core.task import Task
from attribution_core.training import fit_model, one_thread, train

GOALS = {"demo": {"top10": 0.843}, "memorising": {"top10": 0.90, "auc": 0.98}}
"""Issue 18's goal for the default ranking ("dynamics"), with no extra training: the demo no worse than the best of before."""

EXTRA_TRAINING = ("cleanlab",)
"""Rankings that train extra models (cross-validation); the goal is for rankings without."""

METRIC_NAMES = {"top10": "top 10 %", "auc": "ROC-AUC"}


@dataclass(frozen=True)
class Setting:
    """A noisy run to rank: its data, model and recipe."""

    data: DataSpec
    model: ModelSpec
    recipe: Recipe


def settings(quick: bool) -> dict[str, Setting]:
    """The two settings; --quick shrinks data and epochs."""
    noisy = next(run for run in demo_runs(tiny=quick) if run.run_id == "fmnist-noisy")
    memorising = Setting(
        DataSpec(source="sample", max_train=600 if quick else 3000, max_test=100 if quick else 500, noise_fraction=0.1, noise_seed=0),
        ModelSpec("mlp", {"hidden": [512, 512]}),
        Recipe((Stage(epochs=100 if quick else 150, lr=0.05, weight_decay=0.0, schedule="cosine"),),
               checkpoints=CheckpointPolicy(every_epochs=None, count=6)),
    )
    return {"demo": Setting(noisy.data, noisy.model, noisy.recipe), "memorising": memorising}


def the_run(workspace: Workspace, name: str, setting: Setting) -> Run:
    """The setting's run, trained unless the workspace already holds it."""
    run_id = f"b4-{name}"
    if run_id in workspace.run_ids():
        return load_run(workspace, run_id)
    return train(setting.data, setting.model, setting.recipe, workspace, run_id)


def evaluate_rankings(run: Run) -> dict[str, dict[str, float]]:
    """{ranking: {top10, top20, auc, seconds}} for every ranking (and kronfluence's where installed)."""
    train_set, _ = run.datasets()
    results = {}
    for name in rankings_for(run):
        ranking = rank_mislabels(run, name)
        results[name] = mislabel_metrics(ranking.scores, train_set.flipped) | {"seconds": ranking.seconds}
    if anchors_installed():
        from anchors import kronfluence_self_influence

        with timed() as clock:
            scores = kronfluence_self_influence(run)
        results["kronfluence self-influence (anchor)"] = mislabel_metrics(scores, train_set.flipped) | {"seconds": clock.seconds}
    return results


def clean_label_reference(run: Run, demo: Setting, folds: int = 5) -> dict[str, float]:
    """Metrics of 1 − p(given label) out of sample from the demo's MLP and recipe trained on the true labels, k-fold.

    Not a ranking (it knows which labels were flipped): what a model of this kind finds when no
    flipped label misled it, a yardstick for the rankings that read one model's view of the labels.
    """
    train_set, _ = run.datasets()
    truth = np.asarray(train_set.original_y)
    clean = dataclasses.replace(train_set, y=torch.as_tensor(truth))
    probabilities = np.zeros((len(train_set), train_set.n_classes))
    with timed() as clock:
        for held_out in fold_masks(truth, folds, demo.recipe.seed):
            with one_thread():
                model = fit_model(clean, demo.model, demo.recipe, keep_mask=~held_out, keep_checkpoints=False).model
            probabilities[held_out] = model_probabilities(model, Task(), train_set.x[torch.as_tensor(held_out)])
    given = probabilities[np.arange(len(train_set)), train_set.y.numpy()]
    return mislabel_metrics(1 - given, train_set.flipped) | {"seconds": clock.seconds}


def goal_line(name: str, results: dict[str, dict[str, float]]) -> tuple[str, bool]:
    """(issue 18's goal for the setting against the "dynamics" ranking and the best ranking without extra training, met?)."""
    goal, reached = GOALS[name], results["dynamics"]
    met = all(reached[metric] >= bound for metric, bound in goal.items())
    without = {ranking: metrics for ranking, metrics in results.items() if ranking not in EXTRA_TRAINING}
    best = max(without, key=lambda ranking: (without[ranking]["top10"], without[ranking]["auc"]))

    def scored(metrics: dict[str, float]) -> str:
        return ", ".join(f"{METRIC_NAMES[metric]} {metrics[metric]:.3f}" for metric in METRIC_NAMES)

    wanted = " and ".join(f"{METRIC_NAMES[metric]} ≥ {bound:.3g}" for metric, bound in goal.items())
    return (f"**Goal** (issue 18: {wanted} with no extra training): dynamics has {scored(reached)}: "
            f"**{'met' if met else 'not met'}**; best without extra training: {best}, {scored(without[best])}."), met


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if not anchors_installed():
        print(ANCHORS_MISSING)
    payload, sections = {}, []
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        chosen = settings(args.quick)
        for name, setting in chosen.items():
            run = the_run(workspace, name, setting)
            results = evaluate_rankings(run)
            goal, met = goal_line(name, results)
            reference = clean_label_reference(run, chosen["demo"])
            payload[name] = {"rankings": results, "goal": {"bounds": GOALS[name], "met": met}, "clean_label_reference": reference}
            rows = [(ranking + (" (5-fold: 5 extra trainings)" if ranking in EXTRA_TRAINING else ""), m["top10"], m["top20"], m["auc"], m["seconds"])
                    for ranking, m in sorted(results.items(), key=lambda item: -item[1]["auc"])]
            sections.append(
                f"### {name}: {setting.model.options['hidden']} MLP, {run.metrics['n_train']} training examples, "
                f"{setting.recipe.stages[0].epochs} epochs; train accuracy {run.metrics['train_accuracy']:.3f}, "
                f"flipped labels fitted {run.metrics['flipped_fit_fraction']:.3f}, test accuracy {run.metrics['test_accuracy']:.3f}\n\n"
                + markdown_table(["ranking", "top 10 %", "top 20 %", "ROC-AUC", "seconds"], rows) + "\n\n" + goal
                + f"\n\nReference, not a ranking (it knows the flips): the demo's {chosen['demo'].model.options['hidden']} MLP trained "
                f"on the true labels, 1 − p(given label) out of 5 folds: top 10 % {reference['top10']:.3f}, top 20 % "
                f"{reference['top20']:.3f}, ROC-AUC {reference['auc']:.3f} ({reference['seconds']:.0f} s).")
    report("b4", "B4 · Mislabel detection (10 % flipped labels)", "\n\n".join(sections), args, {"settings": payload})


if __name__ == "__main__":
    main()
