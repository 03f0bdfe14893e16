"""B4: mislabel detection with 10 % of training labels flipped, every ranking side by side.

Two settings on the Fashion-MNIST sample: "demo" (the demo's noisy MLP run, where the model
does not fit most flipped labels and plain loss already works) and "memorising" (a wider MLP
trained without weight decay, cosine-annealed, until it fits every flipped label, where loss fails and the
rankings separate). Reported: the fraction of flipped labels in the top 10 % / 20 % of each
ranking and its ROC-AUC; kronfluence's EK-FAC self-influence beside ours when installed.

    python benchmarks/b4_mislabel.py [--quick] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

from dataclasses import dataclass

from common import ANCHORS_MISSING, anchors_installed, markdown_table, parser, report, timed, workspace_root

from attribution_core.data import DataSpec
from attribution_core.demo import demo_runs
from attribution_core.evaluation.mislabel import mislabel_metrics, rank_mislabels, rankings_for
from attribution_core.models import ModelSpec
from attribution_core.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.store import Workspace
from attribution_core.training import train


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


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    if not anchors_installed():
        print(ANCHORS_MISSING)
    payload, sections = {}, []
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        for name, setting in settings(args.quick).items():
            run = the_run(workspace, name, setting)
            results = evaluate_rankings(run)
            payload[name] = {"rankings": results}
            rows = [(ranking, m["top10"], m["top20"], m["auc"], m["seconds"])
                    for ranking, m in sorted(results.items(), key=lambda item: -item[1]["auc"])]
            sections.append(
                f"### {name}: {setting.model.options['hidden']} MLP, {run.metrics['n_train']} training examples, "
                f"{setting.recipe.stages[0].epochs} epochs; train accuracy {run.metrics['train_accuracy']:.3f}, "
                f"flipped labels fitted {run.metrics['flipped_fit_fraction']:.3f}, test accuracy {run.metrics['test_accuracy']:.3f}\n\n"
                + markdown_table(["ranking", "top 10 %", "top 20 %", "ROC-AUC", "seconds"], rows))
    report("b4", "B4 · Mislabel detection (10 % flipped labels)", "\n\n".join(sections), args, {"settings": payload})


if __name__ == "__main__":
    main()
