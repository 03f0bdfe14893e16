"""What every attribution method receives and returns.

A method is a class with a typed `Settings` dataclass and two phases:
- `fit(inputs) -> TrainState`: the train-side work (features, curvature, preconditioned
  gradients), done once per (run, method, settings, checkpoints) and stored in the workspace;
- `score(state, inputs, query_x, query_y) -> (n_queries, n_train)` scores in the project's
  one sign convention: positive = proponent (including the training example raises the
  query's measurement). Scoring new queries costs their gradients and a product.
`self_influence(state, inputs) -> (n_train,)` where the method defines it, else None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from ..task import Task

ProgressFn = Callable[[int, int], None]
"""progress(done, total): called as work advances; the CLI passes tqdm, the app st.progress."""

TrainState = dict[str, torch.Tensor]
"""Train-side results of `fit`, saved as safetensors: flat names to tensors."""


def no_progress(done: int, total: int) -> None:
    """The default progress callback: report nothing."""


@dataclass
class Segment:
    """A stretch of training treated as stationary by SOURCE.

    checkpoints: models at the segment's checkpoints (eval mode).
    lr_sum: eta_bar * K, the summed learning rates of the segment's optimizer steps, already
        scaled by 1/(1 - momentum) for SGD with momentum.
    """

    checkpoints: list[nn.Module]
    lr_sum: float


@dataclass
class AttributionInputs:
    """Everything a method may use: models, training data, task, device, chunking, progress.

    checkpoints: models at the chosen checkpoints, oldest first, eval mode, on `device`.
    checkpoint_lrs: learning rate in force at each checkpoint (TracIn's eta_c).
    train_x: (n_train, ...) model-ready inputs; train_y: (n_train,) int64 labels.
    segments: SOURCE's segments (oldest first); None for the other methods.
    """

    checkpoints: list[nn.Module]
    checkpoint_lrs: list[float]
    train_x: torch.Tensor
    train_y: torch.Tensor
    task: Task = field(default_factory=Task)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256
    progress: ProgressFn = no_progress
    segments: list[Segment] | None = None

    def train_batches(self, rows: slice | None = None):
        """(start, x, y) chunks of the training set (or of its rows) on the device, batch_size at a time.

        start is the chunk's index in the whole training set.
        """
        first, stop = (0, len(self.train_y)) if rows is None else (rows.start, rows.stop)
        for start in range(first, stop, self.batch_size):
            end = min(start + self.batch_size, stop)
            yield start, self.train_x[start:end].to(self.device), self.train_y[start:end].to(self.device)


class Method(Protocol):
    """The protocol every method class follows (see the module docstring)."""

    name: ClassVar[str]

    def fit(self, inputs: AttributionInputs) -> TrainState: ...

    def score(
        self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor
    ) -> torch.Tensor: ...

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor | None: ...
