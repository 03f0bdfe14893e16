"""B9: the cleaning experiment: the predicted effect of fixing suspected labels against retraining with them fixed.

Two runs, both with 10 % of their training labels flipped to a random other class (DataSpec noise, seed 0):
- noisy: the demo's fmnist-noisy (3,000 sample images, MLP 784-128-10, 12 epochs, weight decay 1e-4), as `tdx demo`
  trains it. It learns through its noise: the flipped labels barely cost it test accuracy;
- memorising: 1,000 of the same images, an MLP four times wider (512) trained 80 epochs without weight decay. It fits
  every flipped label (flipped_fit_fraction 1.0), and they cost it test accuracy (0.770 against 0.804 with clean labels,
  seed 0): a run where cleaning has something to recover.
Plans: the default ranking's (training dynamics) top 5 % and 10 %, relabelled by its suggestion (removed where it
suggests the given class); the oracle, exactly the flipped labels relabelled to their true classes (Dataset.original_y);
random plans of the same sizes as the top 5 % and 10 % (random examples given random other classes).
For each plan: the predicted change of test accuracy and of every test margin (cleaning.predict, EK-FAC by default,
TRAK and SOURCE beside it), against the run retrained with the plan and with a random control of the same size, on the
same seeds (cleaning.experiment). Spearman: predicted against actual per-query margin change (the seeds' mean);
"as removals": the same with every planned example removed instead (what removal scores alone predict).
--smoke runs tiny sizes (a minute) and writes no RESULTS.md; this script adds the option where common.parser has none.

    python benchmarks/b9_cleaning.py [--quick | --smoke] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from common import markdown_table, parser, report, timed, workspace_root
from scipy.stats import spearmanr

from attribution_core.api import stored_scores
from attribution_core.cleaning.experiment import (
    ExperimentResult,
    ExperimentSettings,
    clean_and_retrain,
    compare,
    random_plan,
)
from attribution_core.cleaning.plan import CleaningPlan, PlanEntry, PlanSource, make_plan, plan_indices
from attribution_core.cleaning.predict import (
    DEFAULT_METHOD,
    PredictedEffect,
    margin_change,
    predict_effect,
    stored_prediction,
)
from attribution_core.data import DataSpec
from attribution_core.evaluation.mislabel import default_ranking, rank_mislabels
from attribution_core.models import ModelSpec
from attribution_core.runs.demo import demo_runs
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import Workspace

JSON_KEYS = ("settings",)
"""The --json output's top-level keys: {"settings": {"noisy": {"plans": {...}, ...}, "memorising": {...}}}."""
PLANS = ("top5", "top10", "oracle", "random5", "random10")
JSON_PLANS = ("top5", "top10", "oracle", "random10")
"""The plans the --json output's "plans" holds (other tools read these names); random5 is in the table."""


@dataclass(frozen=True)
class Setting:
    """A run to clean: how it is trained, with which seeds and methods it is measured."""

    name: str
    run_id: str
    data: DataSpec
    model: ModelSpec
    recipe: Recipe
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    plans: tuple[str, ...] = PLANS


def settings(size: str) -> list[Setting]:
    """The two runs at a size: "full", "quick" (smaller data and fewer epochs, two seeds) or "smoke" (seconds, one seed)."""
    noisy = next(run for run in demo_runs(tiny=size != "full") if run.run_id == "fmnist-noisy")
    n_memorising, epochs = {"full": (1000, 80), "quick": (400, 30), "smoke": (150, 4)}[size]
    memorising = Recipe((Stage(epochs=epochs, lr=0.05, schedule="cosine", weight_decay=0.0),), seed=0,
                        checkpoints=CheckpointPolicy(every_epochs=None, count=6))
    seeds = {"full": (0, 1, 2), "quick": (0, 1), "smoke": (0,)}[size]
    methods = (DEFAULT_METHOD, "trak", "source") if size == "full" else (DEFAULT_METHOD,)
    chosen = ("top10", "oracle", "random10") if size == "smoke" else PLANS
    noisy_recipe = noisy.recipe if size != "smoke" else Recipe((Stage(epochs=1, lr=0.05),), checkpoints=noisy.recipe.checkpoints)
    return [
        Setting("noisy", noisy.run_id, noisy.data if size != "smoke" else DataSpec(source="sample", max_train=200, max_test=60,
                                                                                     noise_fraction=0.1, noise_seed=0),
                noisy.model, noisy_recipe, seeds, methods, chosen),
        Setting("memorising", "fmnist-memorising",
                DataSpec(source="sample", max_train=n_memorising, max_test=500 if size == "full" else 100,
                         noise_fraction=0.1, noise_seed=0),
                ModelSpec("mlp", {"hidden": [512]}), memorising, seeds, methods, chosen),
    ]


def the_run(workspace: Workspace, setting: Setting) -> Run:
    """The setting's run, trained unless the workspace holds it."""
    if setting.run_id in workspace.run_ids():
        return load_run(workspace, setting.run_id)
    return train(setting.data, setting.model, setting.recipe, workspace, setting.run_id)


def plans(run: Run, names: tuple[str, ...]) -> dict[str, CleaningPlan]:
    """The named plans (of PLANS) on the run."""
    train_set, _ = run.datasets()
    n = len(train_set)
    name = default_ranking(run)[0]
    ranking = rank_mislabels(run, name)
    made = {f"top{share}": make_plan(run, PlanSource(flags=False, ranking=name, top_k=round(share / 100 * n)), {}, ranking)
            for share in (5, 10)}
    flipped = np.flatnonzero(train_set.flipped)
    made["oracle"] = CleaningPlan(run.run_id,
                                  tuple(PlanEntry(int(train_set.ids[index]), "relabel", int(train_set.original_y[index]), "oracle")
                                        for index in flipped),
                                  "the flipped labels, relabelled to their true classes")
    for share in (5, 10):
        made[f"random{share}"] = random_plan(run, round(share / 100 * n), 0, seed=share)
    return {name: made[name] for name in names}


def as_removals(run: Run, plan: CleaningPlan, method: str) -> np.ndarray:
    """(n_test,) the predicted margin change with every planned change a removal (the removal scores alone)."""
    changed = np.concatenate([plan_indices(run, plan, "remove"), plan_indices(run, plan, "relabel")])
    return margin_change(stored_scores(run, method).values, changed, np.array([], dtype=int), None)


def seed_agreement(result: ExperimentResult) -> float:
    """Mean Spearman, over pairs of seeds, of their actual per-query margin changes (nan with one seed): the noise ceiling."""
    changes = result.margins["cleaned"] - result.margins["base"]
    pairs = [spearmanr(changes[a], changes[b]).statistic for a in range(len(changes)) for b in range(a + 1, len(changes))]
    return float(np.mean(pairs)) if pairs else float("nan")


def measure(run: Run, plan: CleaningPlan, method: str) -> tuple[PredictedEffect, float, float]:
    """(the predicted effect, seconds to score the test set for it (a job's work), seconds to predict from the stored scores)."""
    with timed() as scoring:
        predict_effect(run, plan, method)
    with timed() as answering:
        predicted = stored_prediction(run, plan, method)
    return predicted, scoring.seconds, answering.seconds


def run_setting(workspace: Workspace, setting: Setting) -> tuple[list[tuple], list[tuple], dict]:
    """(rows of the main table, rows of the methods table, the JSON of this setting)."""
    run = the_run(workspace, setting)
    train_set, _ = run.datasets()
    rows, method_rows, payload = [], [], {"plans": {}, "other_plans": {}, "run": {}}
    experiment = ExperimentSettings(seeds=setting.seeds, keep_run=False)
    made = plans(run, setting.plans)
    oracle_gain = None
    for name, plan in made.items():
        actual = clean_and_retrain(run, plan, experiment)
        for method in setting.methods:
            predicted, scoring, answering = measure(run, plan, method)
            fared = compare(predicted, actual)
            removal_only = float(spearmanr(as_removals(run, plan, method), actual.margin_change("cleaned")).statistic)
            method_rows.append((setting.name, name, method, fared.spearman, removal_only, f"{fared.predicted_accuracy_change:+.3f}",
                                scoring, answering))
            if method != DEFAULT_METHOD:
                continue
            gain = fared.accuracy_change
            oracle_gain = gain if name == "oracle" else oracle_gain
            counts = plan.counts()
            found = int(train_set.flipped[np.concatenate([plan_indices(run, plan, "relabel"), plan_indices(run, plan, "remove")])].sum())
            rows.append((setting.name, name, f"{counts['relabel']} / {counts['remove']} ({found} flipped)",
                         f"{fared.predicted_accuracy_change:+.3f}",
                         f"{gain:+.3f} ± {fared.accuracy_change_std:.3f}", f"{fared.control_accuracy_change:+.3f}", fared.spearman,
                         removal_only, seed_agreement(actual), f"{fared.predicted_flips} / {fared.observed_flips} / {fared.flips_both}",
                         answering, scoring))
            entry = {"spearman_margin_change": fared.spearman, "predicted_accuracy_change": fared.predicted_accuracy_change,
                     "accuracy_change": gain, "prediction_seconds": answering, "accuracy_change_std": fared.accuracy_change_std,
                     "control_accuracy_change": fared.control_accuracy_change, "spearman_as_removals": removal_only,
                     "scoring_seconds": scoring, "flips_predicted": fared.predicted_flips, "flips_observed": fared.observed_flips,
                     "flips_both": fared.flips_both, "size": len(plan.entries)}
            payload["plans" if name in JSON_PLANS else "other_plans"][name] = entry
    payload["run"] = {"n_train": len(train_set), "test_accuracy": run.metrics["test_accuracy"],
                      "flipped_fit_fraction": run.metrics.get("flipped_fit_fraction"), "oracle_accuracy_change": oracle_gain}
    return rows, method_rows, payload


def goals(payload: dict) -> list[str]:
    """The issue's goals, each with whether this run met it."""
    noisy, memorising = payload["noisy"]["plans"], payload["memorising"]["plans"]
    slowest = max(plan["prediction_seconds"] for setting in payload.values() for plan in setting["plans"].values())
    oracle_change = memorising["oracle"]["accuracy_change"]
    recovered = memorising["top10"]["accuracy_change"] / oracle_change if oracle_change else float("nan")

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    return [f"- noisy run, top-10 % plan: Spearman of predicted against actual per-query margin change "
            f"{noisy['top10']['spearman_margin_change']:.2f} "
            f"(goal >= 0.6: {met(noisy['top10']['spearman_margin_change'] >= 0.6)})",
            f"- memorising run: the top-10 % plan recovers {recovered:.0%} of the oracle's accuracy gain "
            f"({memorising['top10']['accuracy_change']:+.3f} of {memorising['oracle']['accuracy_change']:+.3f}; "
            f"goal >= 50 %: {met(recovered >= 0.5)})",
            f"- a plan's prediction from stored scores: at most {slowest:.2f} s (goal <= 2 s: {met(slowest <= 2)})"]


def main() -> None:
    cli = parser(__doc__.splitlines()[0])
    if not any("--smoke" in action.option_strings for action in cli._actions):  # common.parser offers it on newer branches
        cli.add_argument("--smoke", action="store_true", help="tiny sizes, a minute, no RESULTS.md")
    args = cli.parse_args()
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        rows, method_rows, payload = [], [], {}
        for setting in settings(size):
            setting_rows, setting_methods, payload[setting.name] = run_setting(workspace, setting)
            rows += setting_rows
            method_rows += setting_methods
    runs = "; ".join(f"{name}: {values['run']['n_train']} training examples, test accuracy {values['run']['test_accuracy']:.3f}, "
                     f"fits {values['run']['flipped_fit_fraction']:.0%} of its flipped labels" for name, values in payload.items())
    body = (f"{runs}. Predicted by {DEFAULT_METHOD}; actual: retrained on seeds {list(settings(size)[0].seeds)} (offsets from the run's "
            "seed), each beside the run retrained as it was on the same seed.\n\n"
            + markdown_table(["run", "plan", "relabelled / removed", "predicted Δ accuracy", "actual Δ accuracy (± sd over seeds)",
                              "control Δ accuracy", "Spearman, margin change", "Spearman, as removals", "seeds agree (Spearman)",
                              "flips predicted / observed / both", "prediction s (stored scores)", "scoring s (job)"], rows)
            + "\n\nEvery method that estimates removals, on the same plans and retrains:\n\n"
            + markdown_table(["run", "plan", "method", "Spearman, margin change", "Spearman, as removals", "predicted Δ accuracy",
                              "scoring s (job)", "prediction s"], method_rows)
            + "\n\nGoals:\n\n" + "\n".join(goals(payload)))
    if args.smoke:
        args.no_results = True
    report("b9", "B9 · The cleaning experiment: predicted against actual", body, args, {"settings": payload})


if __name__ == "__main__":
    main()
