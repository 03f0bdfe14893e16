"""B7: replay (exact metagradients through the recorded run) beside the approximations, against both ground truths.

Runs: B1's digits MLP (64-128-10, 20 epochs of SGD), and the demo's fmnist-mlp-early (2 epochs,
still improving) and fmnist-two-stage (noisy pretraining, fine-tuning on five classes), each
trained with its record. Two ground truths per run, on random subsets of the training set:
- order_keeping: the recorded run replayed in its batch order with the removed examples weighted
  0 in their batch slots (5 % removed per subset, MAGIC's evaluation) — the question replay answers;
- reshuffled: each subset retrained from scratch by the recipe (50 % kept, B1's ground truth).
Every method scores the first --queries test examples; LDS over them. Cost: seconds per query
when scoring one query at a time and in blocks of 32, against the seconds of one plain training
run of the same recipe timed in the same process just before (no record written; the run's
recorded training time, taken when it was trained, is in the JSON as recorded_train_seconds).
Rounding sensitivity: the first subsets of the order-keeping ground truth replayed again in
float64; the rms change of the queries' margins from float32 rounding alone, over their spread
across subsets. Near 0, the ground truth is a smooth function of the weights; a sizeable
fraction means training amplifies perturbations of rounding size (ReLU kinks flipped, then
grown), and no first-order score, replay's exact derivative included, can predict that part.
--quick: 32 queries, 20 subsets; --smoke: the runs on 256 training and 32 test images with narrow
MLPs (common.smoke_model; the demo's runs from the tiny demo), 8 queries, 4 subsets.

    python benchmarks/b7_replay.py [--quick | --smoke] [--queries N] [--subsets M] [--json PATH] [--workspace DIR] [--workers N]
"""
from __future__ import annotations

import argparse

import numpy as np
from b1_digits_lds import DATA as B1_DATA
from b1_digits_lds import MODEL as B1_MODEL
from b1_digits_lds import RECIPE as B1_RECIPE
from common import (
    add_workers_option,
    by_mode,
    demo_run,
    markdown_table,
    parser,
    report,
    shrunk,
    timed,
    workers,
    workspace_root,
)
from replay_checks import float64_check

from attribution_core.api import attribute
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.runs.run import Run, load_run
from attribution_core.runs.training import fit_model, train
from attribution_core.store import Workspace

METHODS = {"replay": {}, "source": {}, "trak": {}, "ekfac": {}, "tracin": {}}
"""The methods compared, at their defaults."""
BLOCK = 32
JSON_KEYS = ("runs",)
ROUNDING_SUBSETS = 10
"""Subsets of the order-keeping ground truth replayed again in float64 (all of them where there are fewer)."""


def the_runs(workspace: Workspace, args: argparse.Namespace) -> dict[str, Run]:
    """B1's digits run and the two demo runs (cut by a smoke run's sizes), trained (with their records) unless the workspace holds them."""
    wanted = {"digits-b1": (*shrunk(args, B1_DATA, B1_MODEL), B1_RECIPE)}
    wanted |= {run_id: demo_run(args, run_id, tiny=False) for run_id in ("fmnist-mlp-early", "fmnist-two-stage")}
    runs = {}
    for run_id, (data, model, recipe) in wanted.items():
        existing = run_id in workspace.run_ids() and load_run(workspace, run_id)
        runs[run_id] = existing if existing and existing.record is not None else train(data, model, recipe, workspace, run_id)
    return runs


def per_query_seconds(run: Run, method: str, queries: np.ndarray, block: int) -> float:
    """Seconds per query to score `block` queries at once (fewer where the queries run out; train-side work already done and stored)."""
    attribute(run, method, queries=queries[:1], device="cpu")  # the fit, outside the clock
    timed_queries = queries[1 : 1 + block]
    with timed() as clock:
        attribute(run, method, queries=timed_queries, device="cpu")
    return clock.seconds / len(timed_queries)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--queries", type=int, default=None,
                           help="test examples scored and averaged over (default 100; --quick 32; --smoke 8)")
    arguments.add_argument("--subsets", type=int, default=None, help="subsets per ground truth (default 100; --quick 20; --smoke 4)")
    add_workers_option(arguments, default=2)
    args = arguments.parse_args()
    n_queries = args.queries or by_mode(args, full=100, quick=32, smoke=8)
    n_subsets = args.subsets or by_mode(args, full=100, quick=20, smoke=4)
    truths = {"order_keeping": LdsSettings(n_subsets=n_subsets, alpha=0.95, mode="order_keeping"),
              "reshuffled": LdsSettings(n_subsets=n_subsets, alpha=0.5)}
    payload, sections = {"runs": {}}, []
    with workspace_root(args.workspace) as root:
        for run_id, run in the_runs(Workspace(root), args).items():
            queries = np.arange(min(n_queries, len(run.datasets()[1])))
            ground = {}
            for name, settings in truths.items():
                with timed() as clock:
                    ground[name] = groundtruth(run, settings, workers=1 if name == "order_keeping" else workers(args))
                print(f"{run_id}: {name} ground truth in {clock.seconds:.1f} s", flush=True)
            with timed() as clock:
                fit_model(run.datasets()[0], run.model, run.recipe, keep_checkpoints=False)
            train_seconds = clock.seconds
            sensitivity = float64_check(run, ground["order_keeping"], queries, ROUNDING_SUBSETS).rounding_sensitivity
            print(f"{run_id}: rounding sensitivity {sensitivity:.3g}", flush=True)
            rows, methods = [], {}
            for method, settings in METHODS.items():
                with timed() as clock:
                    scores = attribute(run, method, queries=queries, settings=settings, device="cpu")
                entry = {f"lds_{name}": lds(scores, truth).mean for name, truth in ground.items()}
                entry["seconds_per_query"] = per_query_seconds(run, method, queries, 1)
                entry["seconds_per_query_block32"] = per_query_seconds(run, method, queries, BLOCK)
                entry["seconds_all"] = clock.seconds
                methods[method] = entry
                rows.append((method, entry["lds_order_keeping"], entry["lds_reshuffled"], entry["seconds_per_query"],
                             entry["seconds_per_query"] / train_seconds, entry["seconds_per_query_block32"],
                             entry["seconds_per_query_block32"] / train_seconds))
                print(f"{run_id} {method}: {entry}", flush=True)
            payload["runs"][run_id] = {"train_seconds": train_seconds, "steps": run.record.n_steps, "rounding_sensitivity": sensitivity,
                                       "recorded_train_seconds": run.metrics["train_seconds"],
                                       "methods": methods}
            sections.append(
                f"### {run_id}: {run.metrics['n_train']} training examples, {run.record.n_steps} optimizer steps, one plain training run "
                f"{train_seconds:.2f} s; {len(queries)} queries, {n_subsets} subsets per ground truth; rounding sensitivity "
                f"{sensitivity:.2g}\n\n"
                + markdown_table(["method", "LDS order-keeping (5 % removed)", "LDS reshuffled (50 % kept)", "s / query",
                                  "÷ training", "s / query in blocks of 32", "÷ training"], rows))
    body = ("Two questions, two ground truths: order-keeping (the same batches, the removed examples weighted 0: what "
            "replay differentiates) and reshuffled (each subset retrained from scratch). Seconds per query exclude the "
            "train-side fit, done once per run and stored; the training run they are divided by is a plain one (no record) "
            "timed just before. Rounding sensitivity: the rms change of the queries' margins between float32 and float64 "
            "replays of the same subsets, over their spread across subsets (near 0: a smooth ground truth; large: training "
            "amplifies rounding-size perturbations, which no first-order score can predict).\n\n" + "\n\n".join(sections))
    report("b7", "B7 · Replay against the approximations", body, args, payload)


if __name__ == "__main__":
    main()
