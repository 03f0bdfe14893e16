"""Your own model in your own PyTorch loop, recorded for tda-explorer: a small CNN on the shipped Fashion-MNIST sample.

    python examples/own_training_loop.py                   # 6,000 images, 4 epochs: about a minute on a CPU
    python examples/own_training_loop.py --tiny            # 200 images, 2 epochs: seconds (the tests run this)
    tdx app --workspace workspace                          # then open the run it prints

The loop is plain PyTorch (random crops and flips, SGD with momentum, a cosine schedule); the
Recorder adds four lines: open it, `recorder.step(...)` after each optimizer step, `recorder.checkpoint()`
per epoch, and leaving the `with` block writes the run.
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
    # the factory below is found again as "examples.own_training_loop:small_cnn", from the repository root (the
    # app puts it on sys.path); your own factory lives in your own installed package and needs nothing like this
    sys.path.insert(0, str(ROOT))

from attribution_core.data import DataSpec  # noqa: E402
from attribution_core.runs.recorder import Recorder, RecorderSettings  # noqa: E402
from attribution_core.runs.run import Run  # noqa: E402

FACTORY = "examples.own_training_loop:small_cnn"
"""Where the run finds the architecture again when it is opened: "package.module:function"."""


def small_cnn(input_shape: tuple[int, ...], n_classes: int, channels: tuple[int, ...] = (16, 32), hidden: int = 64) -> nn.Module:
    """Two conv3x3-ReLU-maxpool blocks, a hidden layer and the classifier (a factory: input shape, classes, options)."""
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ExampleSettings:
    """What to train, for how long, and where to record it."""

    workspace: str = "workspace"
    run_id: str = "own-loop-cnn"
    epochs: int = 4
    max_train: int | None = None
    max_test: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0


TINY = {"epochs": 2, "max_train": 200, "max_test": 100}
"""--tiny: small enough for a test to run in seconds."""


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crops (pad by `pad`, crop back) and horizontal flips of a batch (B, C, H, W)."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    height, width = images.shape[-2:]
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def train_and_record(settings: ExampleSettings) -> Run:
    """Train the CNN in a plain loop, recording every step; returns the recorded run."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    data = DataSpec(source="sample", max_train=settings.max_train, max_test=settings.max_test)
    model = small_cnn((1, 28, 28), 10)
    # the loss below is plain cross-entropy, so each example's margin follows from its loss (no logits kept)
    recording = RecorderSettings(margins_from_losses=True)
    with Recorder(settings.workspace, settings.run_id, model=model, factory=FACTORY, data=data, seed=settings.seed,
                  settings=recording) as recorder:
        # train on the recorder's copy of the data: the run reloads exactly these rows, in this order
        x, y = recorder.train_set.x, recorder.train_set.y
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=5e-4)
        steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        model.train()
        for epoch in range(settings.epochs):
            for batch in torch.randperm(len(x), generator=generator).split(settings.batch_size):
                # augmentation happens here, in the loop: the record keeps the batch's rows, so attribution
                # scores each training example on its un-augmented image (the record cannot know the crop)
                losses = F.cross_entropy(model(augment(x[batch], generator)), y[batch], reduction="none")
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                optimizer.step()
                recorder.step(optimizer, batch, losses=losses)  # after optimizer.step(), before the scheduler moves the lr
                scheduler.step()
            info = recorder.checkpoint()
            print(f"epoch {epoch + 1}/{settings.epochs}: test accuracy {info.test_accuracy:.1%}")
    assert recorder.run is not None  # the block ended normally: the run is complete
    return recorder.run


def main(argv: list[str] | None = None) -> None:
    """Parse the options, train and record, and print the command that opens the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = ExampleSettings()
    parser.add_argument("--workspace", default=defaults.workspace)
    parser.add_argument("--run-id", default=defaults.run_id)
    parser.add_argument("--epochs", type=int, default=None, help=f"passes over the training set (default {defaults.epochs})")
    parser.add_argument("--max-train", type=int, default=None, help="use this many training images (default: all 6,000)")
    parser.add_argument("--max-test", type=int, default=None, help="use this many test images (default: all 1,000)")
    parser.add_argument("--tiny", action="store_true", help="2 epochs on 200 images: seconds, for tests")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    chosen = {"epochs": args.epochs, "max_train": args.max_train, "max_test": args.max_test}
    sizes = {**(TINY if args.tiny else {}), **{name: value for name, value in chosen.items() if value is not None}}
    settings = ExampleSettings(workspace=args.workspace, run_id=args.run_id, seed=args.seed, **sizes)
    run = train_and_record(settings)
    print(f"recorded run {run.run_id}: {run.record.n_steps} steps, {len(run.checkpoints)} checkpoints, "
          f"test accuracy {run.metrics['test_accuracy']:.1%}")
    print(f"open it with:  tdx app --workspace {run.workspace.root}")
    print(f"(then choose run {run.run_id} in the sidebar, or open http://localhost:8501/?run={run.run_id})")


if __name__ == "__main__":
    main()
