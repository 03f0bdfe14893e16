"""B8: your own loop, as a training function: every method's LDS against retrainings of that loop, replay exact through it.

The loop is examples/own_training_loop.py's `train`, written the way users write them: a
BatchNorm CNN with dropout, random crops and flips, SGD with Nesterov momentum, warm-up then
cosine; recorded with `record_run` on the first --train Fashion-MNIST training images (Debian's
dataset-fashion-mnist) for --epochs epochs, a checkpoint per epoch. Then, on the first --queries
test images:
- (a) reshuffled LDS of every method that can attribute the run, against --subsets retrainings of
  that same loop on random halves (the run's function called again, batches drawn afresh), beside
  traker (TRAK, k = 1024, λ = 100, last five checkpoints) and kronfluence (EK-FAC, final checkpoint)
  on the same checkpoints;
- (b) replay's LDS against the order-keeping ground truth (the loop given its recorded batches with
  5 % of the examples weighted 0 in their slots), and the largest relative difference of the
  replayed weights and running statistics from the recorded checkpoints; then the same question
  without rounding (replay_checks.float64_check): the ground truth's first 10 subsets retrained by
  replay in float64, against replay's float64 derivative for the first --float64-queries images;
- (c) seconds per query of each method (its train-side fit excluded, done once and stored),
  divided by one training of the loop timed in the same process;
- (d) whether scoring augmented examples helps: TRAK with each training example's features averaged
  over --augmentations copies drawn by the loop's own augmentation (queries un-augmented), against
  TRAK on the un-augmented examples (the field's convention, and every method's default here).

    python benchmarks/b8_own_loop.py [--quick | --smoke] [--train N] [--epochs E] [--subsets M] [--queries Q]
                                     [--json PATH] [--workspace DIR]
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from common import (
    SMOKE_TEST,
    SMOKE_TRAIN,
    anchors_available,
    by_mode,
    markdown_table,
    parser,
    report,
    timed,
    workspace_root,
)
from replay_checks import float64_check
from torch import nn

from attribution_core.api import QueryBatch, attribute, prepare
from attribution_core.data import DataSpec
from attribution_core.evaluation.lds import LdsSettings, groundtruth, lds
from attribution_core.methods import METHODS
from attribution_core.methods.trak import Trak
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.numerics.projected_gradients import projected_features
from attribution_core.numerics.projection import Projector
from attribution_core.runs.replay_engine import relative_difference, replay_forward, replay_plan
from attribution_core.runs.run import Run, load_run
from attribution_core.runs.threads import one_thread
from attribution_core.runs.training import load_function, record_run, retrain
from attribution_core.scores import Scores
from attribution_core.store import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the example's loop, found by name from the repository root
JSON_KEYS = ("train_seconds", "methods", "anchors", "replay", "details", "trak_augmentation_averaged")
RUN_ID = "own-loop-b8"
TRAIN = "examples.own_training_loop:train"
FACTORY = "examples.own_training_loop:small_cnn"


def the_run(workspace: Workspace, n_train: int, n_test: int, epochs: int) -> Run:
    """The loop recorded on n_train Fashion-MNIST images (reused when the workspace holds it at these sizes)."""
    data = DataSpec(source="fashion_mnist", max_train=n_train, max_test=n_test)
    if RUN_ID in workspace.run_ids():
        run = load_run(workspace, RUN_ID)
        if run.data == data and run.trained_by is not None and run.trained_by.options.get("epochs") == epochs:
            return run
    return record_run(workspace, RUN_ID, TRAIN, data=data, model=FACTORY, options={"epochs": epochs, "warmup_steps": 50}, seed=0)


def one_training_seconds(run: Run) -> float:
    """Seconds of one training of the loop (the run's function called again, nothing recorded), in this process."""
    with timed() as clock, one_thread():
        retrain(run)
    return clock.seconds


def replay_difference(run: Run) -> float:
    """The largest relative difference of the replayed weights and running statistics from the run's last checkpoint."""
    final, _ = replay_forward(replay_plan(run), verify=True)
    return relative_difference(final, run.load_model(-1).state_dict())


def per_query_seconds(run: Run, method: str, first: int, block: int = 8) -> float:
    """Seconds per query to score a block of test images from `first` on (the method's fit stored already).

    Handed over as images (a QueryBatch), which are scored every time and never stored: a workspace that holds
    this block's scores from an earlier run still measures the scoring.
    """
    test_set = run.datasets()[1]
    fresh = slice(first, min(first + block, len(test_set)))
    batch = QueryBatch(test_set.x[fresh], test_set.y[fresh], [f"test {q}" for q in range(len(test_set))[fresh]])
    with timed() as clock:
        attribute(run, method, queries=batch, device="cpu")
    return clock.seconds / len(batch.names)


class AugmentationAveragedTrak(Trak):
    """TRAK whose training features average each example's projected gradient over augmented copies of it."""

    def __init__(self, settings: object, copies: dict[int, list[nn.Module]], augmented: AttributionInputs):
        super().__init__(settings)
        self.copies, self.augmented = copies, augmented

    def train_features(self, model: nn.Module, inputs: AttributionInputs, projector: Projector, on_chunk=lambda: None) -> torch.Tensor:
        """Φ averaged over the model's augmented copies (each copy sees one augmented version of the training set)."""
        return projected_features(self.copies[id(model)], self.augmented, projector, "measurement", on_chunk, self.settings.amp_dtype)


def augmented_training_set(run: Run, draw: int) -> torch.Tensor:
    """The training inputs (N, ...) as one draw of the loop's own augmentation transforms them, chunk by chunk."""
    augment = load_function(run.trained_by.augment_at(1))
    generator = torch.Generator().manual_seed(10_000 + draw)
    return torch.cat([augment(chunk, generator) for chunk in run.datasets()[0].x.split(512)])


def augmentation_averaged_trak(run: Run, queries: np.ndarray, n_augmentations: int) -> Scores:
    """TRAK's scores of the queries with training features averaged over n_augmentations augmented copies of every example."""
    prepared = prepare(run, "trak", device="cpu")
    inputs = prepared.inputs
    views = [augmented_training_set(run, draw) for draw in range(n_augmentations)]
    copies = {id(model): [copy.deepcopy(model) for _ in views] for model in inputs.models}
    augmented = dataclasses.replace(inputs, models=[c for group in copies.values() for c in group],
                                    views=[view for group in copies.values() for view in views[: len(group)]])
    method = AugmentationAveragedTrak(prepared.method.settings, copies, augmented)
    state = method.fit(inputs)
    _, test_set = run.datasets()
    values = method.score(state, inputs, test_set.x[queries], test_set.y[queries]).numpy()
    return Scores(values, "trak", {}, prepared.checkpoints, run.datasets()[0].ids, test_set.y[queries].numpy(),
                  [f"test {q}" for q in queries], queries)


def anchor_scores(run: Run) -> dict[str, np.ndarray]:
    """traker's and kronfluence's scores of the whole test set on the run's checkpoints, where installed."""
    if not anchors_available():
        return {}
    from anchors import kronfluence_scores, traker_scores

    return {"traker": traker_scores(run), "kronfluence": kronfluence_scores(run)}


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--train", type=int, default=None, help="training images (default 4000; --quick 1000; --smoke 256)")
    arguments.add_argument("--epochs", type=int, default=None, help="epochs of the loop (default 6; --quick 3; --smoke 3)")
    arguments.add_argument("--subsets", type=int, default=None, help="retrainings per ground truth (default 60; --quick 12; --smoke 3)")
    arguments.add_argument("--queries", type=int, default=None,
                           help="test images the LDS averages over (default 100; --quick 16; --smoke 4)")
    arguments.add_argument("--workers", type=int, default=2, help="processes retraining the ground truths")
    arguments.add_argument("--augmentations", type=int, default=None,
                           help="augmented copies TRAK's features are averaged over in (d) (default 4; --smoke 2)")
    arguments.add_argument("--replay-queries", type=int, default=None,
                           help="test images replay scores (two to three trainings per query on this CNN; "
                                "default 32; --quick 8; --smoke 2)")
    arguments.add_argument("--float64-queries", type=int, default=None,
                           help="test images replay scores in float64 against float64 retrains of the order-keeping ground truth's "
                                "first 10 subsets (default 8; --quick 4; --smoke 2)")
    args = arguments.parse_args()
    n_train = args.train or by_mode(args, full=4000, quick=1000, smoke=SMOKE_TRAIN)
    epochs = args.epochs or by_mode(args, full=6, quick=3, smoke=3)  # SOURCE needs three checkpoints (one an epoch)
    n_subsets = args.subsets or by_mode(args, full=60, quick=12, smoke=3)
    n_queries = args.queries or by_mode(args, full=100, quick=16, smoke=4)
    args.replay_queries = args.replay_queries or by_mode(args, full=32, quick=8, smoke=2)
    args.float64_queries = args.float64_queries or by_mode(args, full=8, quick=4, smoke=2)
    args.augmentations = args.augmentations or by_mode(args, full=4, quick=4, smoke=2)
    n_test = by_mode(args, full=1000, quick=1000, smoke=SMOKE_TEST)  # room for the timed block after the LDS queries
    with workspace_root(args.workspace) as root:
        run = the_run(Workspace(root), n_train, n_test, epochs)
        queries = np.arange(n_queries)
        train_seconds = one_training_seconds(run)
        print(f"one training of the loop: {train_seconds:.1f} s ({run.record.n_steps} steps)", flush=True)
        truths = {}
        for name, settings in {"reshuffled": LdsSettings(n_subsets=n_subsets, alpha=0.5),
                               "order_keeping": LdsSettings(n_subsets=n_subsets, alpha=0.95, mode="order_keeping")}.items():
            with timed() as clock:
                truths[name] = groundtruth(run, settings, workers=by_mode(args, full=args.workers, quick=args.workers, smoke=1))
            print(f"{name} ground truth: {n_subsets} retrainings in {clock.seconds:.0f} s", flush=True)
        methods, rows = {}, []
        for method in (name for name, method in METHODS.items() if method.unsupported_reason(run) is None):
            scored = queries[: args.replay_queries] if method == "replay" else queries
            with timed() as clock:
                scores = attribute(run, method, queries=scored, device="cpu")
            entry = {"lds_reshuffled": lds(scores, truths["reshuffled"]).mean, "seconds_all": clock.seconds}
            if method == "replay":
                entry["lds_order_keeping"] = lds(scores, truths["order_keeping"]).mean
            entry["seconds_per_query"] = per_query_seconds(run, method, n_queries)
            methods[method] = entry
            rows.append((method, entry["lds_reshuffled"], entry.get("lds_order_keeping", ""), entry["seconds_per_query"],
                         entry["seconds_per_query"] / train_seconds))
            print(f"{method}: {entry}", flush=True)
        anchors = {}
        test_y = run.datasets()[1].y.numpy()
        for name, values in anchor_scores(run).items():
            anchor = Scores(values[queries], name, {}, [], run.datasets()[0].ids, test_y[queries], [f"test {q}" for q in queries], queries)
            anchors[name] = lds(anchor, truths["reshuffled"]).mean
            rows.append((f"{name} (anchor)", anchors[name], "", "", ""))
        augmented_lds = lds(augmentation_averaged_trak(run, queries, args.augmentations), truths["reshuffled"]).mean
        rows.append((f"trak, features averaged over {args.augmentations} augmentations", augmented_lds, "", "", ""))
        print(f"trak averaged over {args.augmentations} augmentations: LDS {augmented_lds:.3f}", flush=True)
        difference = replay_difference(run)
        check = float64_check(run, truths["order_keeping"], queries[: args.replay_queries], lds_queries=args.float64_queries)
        print(f"rounding sensitivity of the order-keeping ground truth: {check.rounding_sensitivity:.3g}; "
              f"replay's LDS, all in float64: {check.lds:.3f}", flush=True)
    payload = {"train_seconds": train_seconds, "methods": {name: {"lds_reshuffled": entry["lds_reshuffled"],
                                                                   "seconds_per_query": entry["seconds_per_query"]}
                                                            for name, entry in methods.items()},
               "anchors": anchors,
               "replay": {"lds_order_keeping": methods.get("replay", {}).get("lds_order_keeping", float("nan")),
                          "checkpoint_relative_difference": difference, "rounding_sensitivity": check.rounding_sensitivity,
                          "float64_lds_order_keeping": check.lds},
               "details": methods, "trak_augmentation_averaged": {"augmentations": args.augmentations, "lds_reshuffled": augmented_lds}}
    body = (f"examples/own_training_loop.py's loop (BatchNorm CNN with dropout, random crops and flips, Nesterov SGD, warm-up then "
            f"cosine) recorded as a training function on {n_train} Fashion-MNIST images for {epochs} epochs ({run.record.n_steps} "
            f"steps; test accuracy {run.metrics['test_accuracy']:.3f}); one training of the loop {train_seconds:.1f} s. LDS over the "
            f"first {n_queries} test images against {n_subsets} retrainings of the loop on random halves (reshuffled) and "
            f"{n_subsets} order-keeping retrainings with 5 % removed; the anchors on the same checkpoints (traker: last five, "
            f"k = 1024, λ = 100; kronfluence EK-FAC: the last). Replay's weights after replaying every step differ from the "
            f"recorded last checkpoint by {difference:.1e} (relative); replay scores the first {args.replay_queries} test images (two to "
            f"three trainings each). Rounding sensitivity of the order-keeping ground truth (float64 against float32 replays of "
            f"its subsets, rms over the spread across subsets; B7 explains it): {check.rounding_sensitivity:.2g}. The same question "
            f"without rounding, everything in float64 (the first {check.n_subsets} order-keeping subsets retrained by replay in float64, "
            f"replay's float64 derivative for the first {check.n_lds_queries} test images): LDS {check.lds:.3f}. Seconds per query "
            f"exclude the fit.\n\n"
            + markdown_table(["method", "LDS reshuffled", "LDS order-keeping (5 % removed)", "s / query", "÷ one training"], rows))
    report("b8", "B8 · Your own loop as a training function", body, args, payload)


if __name__ == "__main__":
    main()
