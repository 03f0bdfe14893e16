"""B1: attribution quality (LDS) on digits, our methods beside the anchor libraries.

The setting of shared/design/benchmarks.md, exactly: sklearn digits (pixels / 16, 360 stratified
test examples, split seed 0), MLP 64-128-10, SGD lr 0.05 momentum 0.9 wd 1e-4, batch 64, 20
epochs, seed 0, a checkpoint after every epoch; ground truth from 100 random 50 % subsets (numpy
seed 0), one retrain each; LDS over all 360 test examples. --quick: 20 subsets; --smoke: 4 subsets
of a run on 256 training and 32 test examples with a narrow MLP (common.smoke_model).

    python benchmarks/b1_digits_lds.py [--quick | --smoke] [--json PATH] [--workspace DIR] [--workers N]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from common import (
    add_workers_option,
    anchors_available,
    by_mode,
    markdown_table,
    parser,
    report,
    shrunk,
    timed,
    workers,
    workspace_root,
)

from attribution_core.api import METHODS, attribute, default_checkpoints
from attribution_core.data import DataSpec
from attribution_core.evaluation.lds import GroundTruth, LdsSettings, groundtruth, lds
from attribution_core.models import ModelSpec
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.scores import Scores
from attribution_core.store import Workspace

RUN_ID = "digits-b1"
DATA = DataSpec(source="digits", test_size=360, split_seed=0)
MODEL = ModelSpec("mlp", {"hidden": [128]})
RECIPE = Recipe((Stage(epochs=20, lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=64),), seed=0,
                checkpoints=CheckpointPolicy(every_epochs=1))
JSON_KEYS = ("methods", "groundtruth_seconds")


@dataclass(frozen=True)
class Contender:
    """One row of the table: a method of ours with its settings and checkpoints."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[int] | None = None


def contenders(args: argparse.Namespace) -> dict[str, Contender]:
    """Every method the core declares, at its defaults, and the projected variants of EK-FAC and SOURCE (k = 4096; a smoke
    run's model has fewer parameters: 512)."""
    k = by_mode(args, full=4096, quick=4096, smoke=512)
    return {
        **{name: Contender(name) for name in METHODS},
        "source_projected": Contender("source", {"k": k}),
        "ekfac_projected": Contender("ekfac", {"k": k}),
    }


def the_run(workspace: Workspace, args: argparse.Namespace) -> Run:
    """The B1 run (cut by a smoke run's sizes), trained unless the workspace already holds it."""
    if RUN_ID in workspace.run_ids():
        return load_run(workspace, RUN_ID)
    data, model = shrunk(args, DATA, MODEL)
    return train(data, model, RECIPE, workspace, RUN_ID)


def configuration(run: Run, contender: Contender) -> str:
    """What a row ran with: its checkpoints and the settings it names (the rest are the method's defaults)."""
    checkpoints = contender.checkpoints or default_checkpoints(run, contender.method)
    named = [f"{name}={value}" for name, value in contender.settings.items()]
    return ", ".join([f"{len(checkpoints)} ckpt" + ("s" if len(checkpoints) > 1 else ""), *named])


def score_ours(run: Run, contender: Contender) -> tuple[Scores, float]:
    """All test queries' scores and the seconds they took (train-side work included)."""
    with timed() as clock:
        scores = attribute(run, contender.method, settings=contender.settings, checkpoints=contender.checkpoints, device="cpu")
    return scores, clock.seconds


def score_anchors(run: Run) -> dict[str, tuple[np.ndarray, float, str]]:
    """Anchor libraries' (scores (n_test, N), seconds, configuration), where installed."""
    if not anchors_available():
        return {}
    from anchors import kronfluence_scores, traker_scores

    results = {}
    for name, function, description in (
        ("traker", traker_scores, "k=1024, λ=100, last 5 ckpts"),
        ("kronfluence", kronfluence_scores, "EK-FAC, final ckpt, damping 1e-3"),
    ):
        with timed() as clock:
            values = function(run)
        results[name] = (values, clock.seconds, description)
    return results


def anchor_scores(values: np.ndarray, run: Run) -> Scores:
    """Anchor values wrapped as Scores of the whole test set."""
    train_set, test_set = run.datasets()
    return Scores(values, "anchor", {}, [], train_set.ids, test_set.y.numpy(), [], query_indices=np.arange(len(test_set)))


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    add_workers_option(arguments, default=1)
    args = arguments.parse_args()
    settings = LdsSettings(n_subsets=by_mode(args, full=100, quick=20, smoke=4), alpha=0.5, seed=0)
    with workspace_root(args.workspace) as root:
        workspace = Workspace(root)
        with timed() as training:
            run = the_run(workspace, args)
        with timed() as retraining:
            truth: GroundTruth = groundtruth(run, settings, workers=workers(args))
        rows, payload = [], {}
        for name, contender in contenders(args).items():
            reason = METHODS[contender.method].unsupported_reason(run)
            if reason is not None:
                print(f"{name}: skipped ({reason})")
                continue
            scores, seconds = score_ours(run, contender)
            result = lds(scores, truth)
            rows.append((f"{name} (ours)", configuration(run, contender), result.mean, result.stderr, seconds))
            payload[name] = {"lds": result.mean, "stderr": result.stderr, "seconds": seconds}
        for name, (values, seconds, description) in score_anchors(run).items():
            result = lds(anchor_scores(values, run), truth)
            rows.append((f"{name} (anchor)", description, result.mean, result.stderr, seconds))
            payload[name] = {"lds": result.mean, "stderr": result.stderr, "seconds": seconds}
    rows.sort(key=lambda row: -row[2])
    body = (f"Run: test accuracy {run.metrics['test_accuracy']:.3f}, trained in {training.seconds:.1f} s. "
            f"Ground truth: {settings.n_subsets} subsets × {settings.seeds_per_subset} seed, alpha {settings.alpha}, "
            f"{retraining.seconds:.1f} s with {workers(args)} worker(s). Settings not named are the method's defaults; "
            f"seconds include the train-side work (features, curvature) and scoring all {run.metrics['n_test']} test examples.\n\n"
            + markdown_table(["method", "configuration", "LDS", "± s.e.", "seconds"], rows))
    report("b1", "B1 · LDS on digits", body, args, {"methods": payload, "groundtruth_seconds": retraining.seconds})


if __name__ == "__main__":
    main()
