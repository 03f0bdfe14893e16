"""What every attribution method receives: models, training data, task, device, chunking, progress.

`AttributionInputs` is built by the front door (api.py) from a run; tests build it by hand from
tensors. `batches` is the one way the core walks a data set in chunks.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SettingsError
from ..progress import ProgressFn, no_progress
from ..store import mapped_zeros
from ..task import Task

TrainState = dict[str, torch.Tensor]
"""Train-side results of a method's `fit`, saved as safetensors: flat names to tensors."""


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device, rows: slice | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, x, y) chunks of a data set (or of its rows) on the device, batch_size at a time.

    start is the chunk's index in the whole data set.
    """
    for start, end in chunk_bounds(len(y), batch_size, rows):
        yield start, x[start:end].to(device), y[start:end].to(device)


def chunk_bounds(n_examples: int, batch_size: int, rows: slice | None = None) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive chunks of batch_size covering the rows (default: all n_examples)."""
    first, stop = (0, n_examples) if rows is None else (rows.start, rows.stop)
    for start in range(first, stop, batch_size):
        yield start, min(start + batch_size, stop)


@dataclass
class Segment:
    """A stretch of training treated as stationary by SOURCE.

    models: the models at the segment's checkpoints (eval mode).
    lr_sum: eta_bar * K, the summed learning rates of the segment's optimizer steps, already
        scaled by 1/(1 - momentum) for SGD with momentum.
    weights: (n_train,) how much each example was trained on in the segment, mean 1 (its share
        of the segment's batches, run.draw_weights); None: every example alike (weight 1).
    """

    models: list[nn.Module]
    lr_sum: float
    weights: torch.Tensor | None = None


@dataclass
class AttributionInputs:
    """Everything a method may use: models, training data, task, device, chunking, progress.

    models: the models at the chosen checkpoints, oldest first, eval mode, on `device`.
    checkpoint_lrs: learning rate in force at each checkpoint (TracIn's eta_c).
    train_x: (n_train, ...) model-ready inputs; train_y: (n_train,) int64 labels.
    segments: SOURCE's segments (oldest first); None for the other methods.
    views: per model, the training inputs (n_train, ...) as its stage saw them (a transform
        applied); None: train_x for every model. Gradients at a model are taken on its view.
    weights: per model, (n_train,) how much each example was trained on in the stretch of
        training the model closes, mean 1 (TracIn weighs each checkpoint's terms by it); None: 1.
    scratch: a directory where per-example results (features, scores) are memory-mapped instead
        of held in RAM when the device is a CPU (result_array); None: in memory.
    """

    models: list[nn.Module]
    checkpoint_lrs: list[float]
    train_x: torch.Tensor
    train_y: torch.Tensor
    task: Task = field(default_factory=Task)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256
    progress: ProgressFn = no_progress
    segments: list[Segment] | None = None
    views: list[torch.Tensor] | None = None
    weights: list[torch.Tensor] | None = None
    scratch: Path | None = None

    def _position(self, model: nn.Module) -> int:
        for position, candidate in enumerate(self.models):
            if candidate is model:
                return position
        raise SettingsError("the model is not one of the inputs' models")

    def train_view(self, model: nn.Module | None = None) -> torch.Tensor:
        """The training inputs (n_train, ...) as the model's stage saw them (train_x without views or model)."""
        return self.train_x if self.views is None or model is None else self.views[self._position(model)]

    def train_weights(self, model: nn.Module) -> torch.Tensor | None:
        """(n_train,) how much each example was trained on in the stretch of training the model closes; None: all alike."""
        return None if self.weights is None else self.weights[self._position(model)]

    def result_array(self, *shape: int) -> torch.Tensor:
        """A float32 array for a per-example result that the caller fills entirely: memory-mapped in scratch on a CPU, else on
        the device."""
        if self.scratch is not None and self.device.type == "cpu":
            return mapped_zeros(self.scratch, shape)
        return torch.empty(shape, device=self.device)

    def train_batches(self, rows: slice | None = None, model: nn.Module | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, x, y) chunks of the training set (or of its rows) on the device, x as the model's stage saw it (see `batches`)."""
        return batches(self.train_view(model), self.train_y, self.batch_size, self.device, rows)

    def model_batches(self, models: Sequence[nn.Module],
                      rows: slice | None = None) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor]]:
        """(start, [x as each model's stage saw it], y) chunks of the training set, for passes over several models at once."""
        views = [self.train_view(model) for model in models]
        for start, end in chunk_bounds(len(self.train_y), self.batch_size, rows):
            yield start, [view[start:end].to(self.device) for view in views], self.train_y[start:end].to(self.device)


def state_tensor(state: TrainState, key: str, device: torch.device) -> torch.Tensor:
    """state[key] on the device; a missing key means the state was fitted with other settings."""
    if key not in state:
        raise SettingsError(f"the fitted state has no {key!r} (fitted with other settings or checkpoints?): fit again")
    return state[key].to(device)
