"""Your own PyTorch loop as a training function: tdx records it, and calls it again to retrain and replay it.

    python examples/own_training_loop.py                 # 6,000 sample images, 4 epochs: about 15 s on 2 CPU cores
    python examples/own_training_loop.py --tiny          # 200 images, 2 epochs: seconds (the tests run this)
    tdx record examples.own_training_loop:train own-loop-cnn --model examples.own_training_loop:small_cnn --data sample
    tdx app --workspace workspace                        # then open the run it prints

The loop is plain PyTorch, written the way people write them: a BatchNorm CNN with dropout,
random crops and flips, SGD with Nesterov momentum, warm-up then cosine. Written as `train(session)`,
it takes its batches (and their randomness) from the session and weighs its losses with
`batch.loss`, so that tdx can call it again: the LDS ground truth, the counterfactual and
smoothness checks and out-of-fold probabilities retrain it, and replay redoes it exactly.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # the functions below are found again as "examples.own_training_loop:...", from the repository root (tdx and the app
    # look in the folder they are started from); your own code lives in your own package and needs nothing like this
    sys.path.insert(0, str(ROOT))

from attribution_core.data import DataSpec  # noqa: E402
from attribution_core.runs.run import Run  # noqa: E402
from attribution_core.runs.session import TrainingSession  # noqa: E402
from attribution_core.runs.training import record_run  # noqa: E402

FACTORY = "examples.own_training_loop:small_cnn"
"""Where the run finds the architecture again when it is opened: "package.module:function"."""
TRAIN = "examples.own_training_loop:train"
"""Where tdx finds the loop again to retrain or replay it."""


def small_cnn(input_shape: tuple[int, ...], n_classes: int, channels: tuple[int, ...] = (16, 32), hidden: int = 64,
              dropout: float = 0.25) -> nn.Module:
    """Two conv3x3-BatchNorm-ReLU-maxpool blocks, a hidden layer with dropout and the classifier (a factory: shape, classes, options)."""
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
                   nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and crops (pad by `pad`, crop back) of a batch (B, C, H, W), drawn from the step's generator."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    height, width = images.shape[-2:]
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at a step: linear warm-up over `warmup` steps, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(session: TrainingSession) -> None:
    """The training loop (options: epochs, batch_size, lr, warmup_steps), as a function of its session."""
    epochs = int(session.options.get("epochs", 4))
    batch_size = int(session.options.get("batch_size", 64))
    warmup = int(session.options.get("warmup_steps", 20))
    model = session.model  # the factory's model, initialised from session.seed
    optimizer = torch.optim.SGD(model.parameters(), lr=float(session.options.get("lr", 0.05)), momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    total = epochs * session.n_batches(batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
    model.train()
    for epoch in range(epochs):
        for batch in session.batches(batch_size, augment=augment):  # the rows, augmented; dropout seeded for the step
            losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
            optimizer.zero_grad(set_to_none=True)
            batch.loss(losses).backward()  # Σ w_i ℓ_i / |B|: an example a retrain removes weighs 0
            optimizer.step()
            session.step(optimizer, batch, losses)  # after optimizer.step(), before the scheduler moves the lr
            scheduler.step()
        session.checkpoint(epoch=epoch + 1)


@dataclass(frozen=True)
class ExampleSettings:
    """What to train, for how long, and where to record it."""

    workspace: str = "workspace"
    run_id: str = "own-loop-cnn"
    epochs: int = 4
    max_train: int | None = None
    max_test: int | None = None
    seed: int = 0


TINY = {"epochs": 2, "max_train": 200, "max_test": 100}
"""--tiny: small enough for a test to run in seconds."""


def train_and_record(settings: ExampleSettings) -> Run:
    """Record the loop as a run that names it (`tdx record` does the same from the command line); returns the run."""
    data = DataSpec(source="sample", max_train=settings.max_train, max_test=settings.max_test)

    def report(done: int, total: int) -> None:
        if total and done == total:
            print(f"trained {done} steps")

    return record_run(settings.workspace, settings.run_id, TRAIN, data=data, model=FACTORY, options={"epochs": settings.epochs},
                      seed=settings.seed, progress=report)


def main(argv: list[str] | None = None) -> None:
    """Parse the options, train and record, and print the command and the address that open the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ExampleSettings()
    parser.add_argument("--workspace", default=defaults.workspace, help="workspace folder (default %(default)s)")
    parser.add_argument("--run-id", default=defaults.run_id, help="name of the run (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help=f"passes over the training set (default {defaults.epochs})")
    parser.add_argument("--max-train", type=int, default=None, help="use this many training images (default: all 6,000)")
    parser.add_argument("--max-test", type=int, default=None, help="use this many test images (default: all 1,000)")
    parser.add_argument("--tiny", action="store_true", help="2 epochs on 200 images: seconds, for tests")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the initial weights, data order and augmentation")
    parser.add_argument("--port", type=int, default=8501, help="the port you will serve the app on, for the address printed")
    args = parser.parse_args(argv)
    chosen = {"epochs": args.epochs, "max_train": args.max_train, "max_test": args.max_test}
    sizes = {**(TINY if args.tiny else {}), **{name: value for name, value in chosen.items() if value is not None}}
    run = train_and_record(ExampleSettings(workspace=args.workspace, run_id=args.run_id, seed=args.seed, **sizes))
    print(f"recorded run {run.run_id}: {run.record.n_steps} steps, {len(run.checkpoints)} checkpoints, "
          f"test accuracy {run.metrics['test_accuracy']:.1%}")
    print(f"open it with:  tdx app --workspace {run.workspace.root} --port {args.port}")
    print(f"then visit     http://127.0.0.1:{args.port}/?run={run.run_id}")


if __name__ == "__main__":
    main()
