"""B5: the counterfactual check at scale: does removing a method's top proponents lower the margin?

For 20 test queries of the demo's converged MLP run (numpy seed 0 picks them), each method's top
5 % proponents are removed, the run is retrained (same recipe, seed offset 0), and the query's
correct-class margin is compared with the full-data model; the same for its top 5 % opponents
and for 5 % random removals. A useful method drops the margin far more than random removal.
--quick: the tiny demo's run (as the tests build it), 5 queries; --smoke: that run on 256 training and
32 test images with a narrow MLP (common.smoke_model), 2 queries.

    python benchmarks/b5_counterfactual.py [--quick | --smoke] [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import numpy as np
from common import by_mode, demo_run, markdown_table, parser, report, timed, workspace_root

from attribution_core.api import METHODS
from attribution_core.evaluation.counterfactual import CounterfactualResult, CounterfactualSettings, counterfactual
from attribution_core.runs.run import Run, load_run
from attribution_core.runs.training import train
from attribution_core.store import Workspace

RUN_ID = "fmnist-mlp"
METHOD_NAMES = ("trak", "ekfac", "source", "tracin", "graddot", "repsim")
JSON_KEYS = ("methods",)


def queries(run: Run, count: int) -> list[int]:
    """count test indices drawn without replacement (numpy seed 0)."""
    _, test_set = run.datasets()
    return sorted(np.random.default_rng(0).choice(len(test_set), size=count, replace=False).tolist())


def drops(results: list[CounterfactualResult], kind: str) -> np.ndarray:
    """(n_queries,) margin drop (base minus after, positive = the margin fell) for one removal kind."""
    return np.array([-result.margin_change(kind) for result in results])


def stderr(values: np.ndarray) -> float:
    """Standard error of the mean."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        run = (load_run(workspace, RUN_ID) if RUN_ID in workspace.run_ids()
               else train(*demo_run(args, RUN_ID, tiny=args.quick), workspace, RUN_ID))
        chosen = queries(run, by_mode(args, full=20, quick=5, smoke=2))
        rows, payload = [], {}
        for position, method in enumerate(name for name in METHOD_NAMES if name in METHODS):
            # Random removals do not depend on the method: draw them once, with the first method.
            settings = CounterfactualSettings(k=0.05, n_random=1 if position == 0 else 0, seeds=(0,))
            with timed() as clock:
                results = [counterfactual(run, query, method, settings=settings) for query in chosen]
            if position == 0:
                random_drop = drops(results, "random_0")
            proponent, opponent = drops(results, "proponents"), drops(results, "opponents")
            flips = np.mean([result.flipped("proponents")[0] for result in results])
            rows.append((method, proponent.mean(), stderr(proponent), -opponent.mean(), random_drop.mean(), flips,
                         clock.seconds / len(chosen)))
            payload[method] = {"proponent_drop": float(proponent.mean()), "random_drop": float(random_drop.mean()),
                               "opponent_rise": float(-opponent.mean()), "flip_fraction": float(flips)}
    rows.sort(key=lambda row: -row[1])
    k = results[0].k
    body = (f"Run {RUN_ID}: {run.metrics['n_train']} training examples, test accuracy {run.metrics['test_accuracy']:.3f}; "
            f"{len(chosen)} queries, k = {k} removed (5 %), one retrain per removal (seed offset 0). "
            f"Random removal drops the margin by {random_drop.mean():.3f} ± {stderr(random_drop):.3f} on average.\n\n"
            + markdown_table(["method", "margin drop, top 5 % proponents removed", "± s.e.", "margin rise, opponents removed",
                              "drop, random removal", "prediction flipped", "seconds per query"], rows))
    report("b5", "B5 · Counterfactual removal on the demo run", body, args, {"methods": payload})


if __name__ == "__main__":
    main()
