"""The training record: what every optimizer step trained on, written as training goes.

runs/<id>/record/ holds chunk files steps_<first step:08d>.safetensors, each a run of consecutive
optimizer steps (1-based step numbers, chunks in order, no gaps):
- per step (T_chunk,): stage int32, lr / momentum / beta2 / weight_decay float64 (momentum is
  SGD's momentum or Adam's beta1; beta2 is 0 for SGD), batch_size int32, optimizer int32 (an
  index into OPTIMIZERS), nesterov int32 (1 for SGD with Nesterov momentum; absent from records
  written before it existed, read as 0);
- per example-step (E_chunk,), batch by batch in step order: indices int32 (training-set rows of
  the batch, as drawn), losses and margins float32 (each example's training loss and
  correct-class margin at that step, from the step's own forward pass; NaN where not given).
Each chunk is written atomically (temporary file, fsync, rename), so a loop killed at any moment
leaves a valid prefix of whole steps: one int32 and two float32 per example-step (60,000
examples x 20 epochs: 14 MB).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..store import load_tensors, save_tensors

OPTIMIZERS = ("sgd", "adam", "adamw", "other")
"""Optimizer names the record knows; anything else is recorded as "other"."""

RECORD_DIR = "record"
_PART = "steps_{:08d}.safetensors"
_STEP_FIELDS = ("stage", "lr", "momentum", "beta2", "weight_decay", "batch_size", "optimizer", "nesterov")
_EXAMPLE_FIELDS = ("indices", "losses", "margins")


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, float | str | bool]:
    """The step's lr, momentum (SGD) or beta1 (Adam), beta2, weight decay, Nesterov flag and optimizer name, read from its first group."""
    group = optimizer.param_groups[0]
    name = type(optimizer).__name__.lower()
    beta1, beta2 = group.get("betas", (group.get("momentum", 0.0), 0.0))
    return {"optimizer": name if name in OPTIMIZERS else "other", "lr": float(group["lr"]), "momentum": float(beta1),
            "beta2": float(beta2), "weight_decay": float(group.get("weight_decay", 0.0)), "nesterov": bool(group.get("nesterov", False))}


@dataclass
class TrainingRecord:
    """Every optimizer step of a run: its hyperparameters, its batch, and each example's loss and margin there.

    Per step (T,): stage, lr, momentum, beta2, weight_decay, batch_size, optimizer (names), nesterov (bool).
    offsets: (T + 1,) int64; step t's batch (1-based t) is indices[offsets[t - 1]:offsets[t]].
    indices: (E,) int64 training-set rows; losses, margins: (E,) float32, NaN where not recorded.
    """

    stage: np.ndarray
    lr: np.ndarray
    momentum: np.ndarray
    beta2: np.ndarray
    weight_decay: np.ndarray
    batch_size: np.ndarray
    optimizer: list[str]
    indices: np.ndarray
    losses: np.ndarray
    margins: np.ndarray
    nesterov: np.ndarray | None = None
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.nesterov = np.zeros(len(self.lr), dtype=bool) if self.nesterov is None else np.asarray(self.nesterov, dtype=bool)
        self.offsets = np.concatenate([[0], np.cumsum(self.batch_size, dtype=np.int64)])
        if self.offsets[-1] != len(self.indices):
            raise DataError(f"training record: batch sizes add up to {self.offsets[-1]} examples but {len(self.indices)} are recorded")

    @property
    def n_steps(self) -> int:
        """How many optimizer steps are recorded."""
        return len(self.lr)

    def batch(self, step: int) -> np.ndarray:
        """Training-set rows of step `step`'s batch (1-based), as drawn."""
        return self.indices[self.offsets[step - 1] : self.offsets[step]]

    def example_steps(self) -> np.ndarray:
        """(E,) the 1-based step of every recorded example-step."""
        return np.repeat(np.arange(1, self.n_steps + 1), self.batch_size)

    def draw_weights(self, first_step: int, last_step: int, n_train: int, step_weights: np.ndarray | None = None) -> np.ndarray:
        """(n_train,) how much each example was trained on in steps first_step..last_step (1-based, inclusive), mean 1.

        Example m's weight is n_train · Σ_t s_t [m ∈ B_t] / |B_t| divided by Σ_t s_t, with s_t the
        step weights (e.g. lr / (1 − momentum); default 1): 1 for every example when each step
        draws uniformly from the whole training set, 0 for an example no batch of the stretch held.
        """
        if not 1 <= first_step <= last_step <= self.n_steps:
            raise DataError(f"steps {first_step}..{last_step} are not within the record's 1..{self.n_steps}")
        weights = np.ones(self.n_steps) if step_weights is None else np.asarray(step_weights, dtype=np.float64)
        steps = slice(first_step - 1, last_step)
        rows = self.indices[self.offsets[first_step - 1] : self.offsets[last_step]]
        per_example = np.repeat(weights[steps] / self.batch_size[steps], self.batch_size[steps])
        total = weights[steps].sum()
        drawn = np.bincount(rows, weights=per_example, minlength=n_train)[:n_train]
        return n_train * drawn / total if total > 0 else np.zeros(n_train)

    @classmethod
    def load(cls, directory: Path) -> TrainingRecord | None:
        """The record stored in directory (a run's record/), or None when there is none."""
        parts = sorted(Path(directory).glob("steps_*.safetensors"))
        if not parts:
            return None
        chunks = [load_tensors(part) for part in parts]
        for chunk in chunks:  # chunks written before the field existed: SGD without Nesterov
            chunk.setdefault("nesterov", torch.zeros(len(chunk["lr"]), dtype=torch.int32))
        columns = {name: np.concatenate([chunk[name].numpy() for chunk in chunks]) for name in (*_STEP_FIELDS, *_EXAMPLE_FIELDS)}
        return cls(
            stage=columns["stage"].astype(np.int64), lr=columns["lr"], momentum=columns["momentum"], beta2=columns["beta2"],
            weight_decay=columns["weight_decay"], batch_size=columns["batch_size"].astype(np.int64),
            optimizer=[OPTIMIZERS[code] for code in columns["optimizer"]], indices=columns["indices"].astype(np.int64),
            losses=columns["losses"], margins=columns["margins"], nesterov=columns["nesterov"],
        )


def cross_entropy_margins(losses: torch.Tensor) -> torch.Tensor:
    """Correct-class margins logit_y − logsumexp_{j≠y} logit_j of cross-entropy losses: −log(e^loss − 1), computed stably.

    The loss is log(1 + Σ_{j≠y} e^{logit_j − logit_y}), so e^loss − 1 = e^{−margin}: the margin needs no logits.
    """
    return -losses - torch.log(-torch.expm1(-losses))


class RecordWriter:
    """Appends steps to a run's record, writing a chunk file every `flush_every` steps (and on flush).

    With margins_from_losses, steps given cross-entropy losses and no margins get their margins
    from the losses at flush time (cross_entropy_margins), so a training step pays nothing for them.
    """

    def __init__(self, directory: Path, *, flush_every: int = 1024, margins_from_losses: bool = False):
        self.directory, self.flush_every, self.margins_from_losses = Path(directory), flush_every, margins_from_losses
        self.steps_written = 0
        self._pending: list[dict] = []
        for stale in self.directory.glob("steps_*.safetensors"):  # a run trained again starts a fresh record
            stale.unlink()

    def append(self, *, stage: int, lr: float, momentum: float, beta2: float, weight_decay: float, optimizer: str,
               indices: Sequence[int] | torch.Tensor, losses: torch.Tensor | None = None, margins: torch.Tensor | None = None,
               nesterov: bool = False) -> None:
        """Record one optimizer step: its hyperparameters, the rows of its batch and (optionally) their losses and margins."""
        rows = torch.as_tensor(indices).detach().reshape(-1)  # conversions wait for the flush: a step pays only for references
        code = OPTIMIZERS.index(optimizer if optimizer in OPTIMIZERS else "other")
        self._pending.append((stage, lr, momentum, beta2, weight_decay, len(rows), code, rows,
                              None if losses is None else losses.detach().reshape(-1),
                              None if margins is None else margins.detach().reshape(-1), int(nesterov)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the pending steps as one chunk file (atomically); nothing to do when none are pending."""
        if not self._pending:
            return
        columns = list(zip(*self._pending))

        def per_example(values: tuple, sizes: tuple) -> torch.Tensor:
            return torch.cat([torch.full((size,), float("nan")) if value is None else value.to("cpu", torch.float32)
                              for value, size in zip(values, sizes)])

        losses = per_example(columns[8], columns[5])
        margins = cross_entropy_margins(losses) if self.margins_from_losses and all(m is None for m in columns[9]) else \
            per_example(columns[9], columns[5])
        tensors = {
            "stage": torch.tensor(columns[0], dtype=torch.int32),
            **{name: torch.tensor(columns[position], dtype=torch.float64)
               for position, name in enumerate(("lr", "momentum", "beta2", "weight_decay"), start=1)},
            "batch_size": torch.tensor(columns[5], dtype=torch.int32),
            "optimizer": torch.tensor(columns[6], dtype=torch.int32),
            "nesterov": torch.tensor(columns[10], dtype=torch.int32),
            "indices": torch.cat([rows.to("cpu", torch.int32) for rows in columns[7]]),
            "losses": losses,
            "margins": margins,
        }
        save_tensors(self.directory / _PART.format(self.steps_written + 1), tensors)
        self.steps_written += len(self._pending)
        self._pending = []


def schedule_summary(record: TrainingRecord, first_step: int = 1, last_step: int | None = None, *,
                     tolerance: float = 0.03) -> dict[str, float | int | str]:
    """What steps first_step..last_step (1-based, inclusive; default: to the end) trained with, read from their record.

    Keys: steps; optimizer (the most frequent name), momentum, beta2, weight_decay (at the first step); first_lr, peak_lr,
    final_lr; warmup_steps (steps before the lr first reaches its peak: 0 without a warm-up); hold_steps (steps at the
    peak from then on); decay_steps (the steps after those); decay: the course of the lr from the end of the hold to the
    last step: "none" (it stays at the peak), "linear" or "cosine" (the closer of a straight line and a half cosine from
    the peak to the final lr, when no step is further than `tolerance` of the drop from it), "step" (else a non-increasing
    lr of at most 5 values) or "other".
    """
    last_step = record.n_steps if last_step is None else last_step
    if not 1 <= first_step <= last_step <= record.n_steps:
        raise DataError(f"steps {first_step}..{last_step} are not within the record's 1..{record.n_steps}")
    lr = np.asarray(record.lr[first_step - 1 : last_step], dtype=np.float64)
    peak = float(lr.max())
    at_peak = np.isclose(lr, peak, rtol=1e-9, atol=0.0)
    warmup = int(np.argmax(at_peak))
    hold = int(np.argmin(at_peak[warmup:])) if not at_peak[warmup:].all() else len(lr) - warmup
    tail = lr[warmup + hold - 1 :]  # from the last step at the peak
    names = record.optimizer[first_step - 1 : last_step]
    return {
        "steps": len(lr), "optimizer": max(set(names), key=names.count),
        "momentum": float(record.momentum[first_step - 1]), "beta2": float(record.beta2[first_step - 1]),
        "weight_decay": float(record.weight_decay[first_step - 1]),
        "first_lr": float(lr[0]), "peak_lr": peak, "final_lr": float(lr[-1]),
        "warmup_steps": warmup, "hold_steps": hold, "decay_steps": len(tail) - 1, "decay": _decay_shape(tail, tolerance),
    }


def _decay_shape(tail: np.ndarray, tolerance: float) -> str:
    """schedule_summary's decay name ("none", "linear", "cosine", "step", "other") of an lr from its peak (tail[0]) to its last step."""
    drop = tail[0] - tail[-1]
    if len(tail) < 2 or drop <= 0:
        return "none" if np.allclose(tail, tail[0], rtol=1e-9, atol=0.0) else "other"
    shapes = {"linear": lambda position: 1 - position, "cosine": lambda position: (1 + np.cos(np.pi * position)) / 2}
    gaps = {name: min(_gap(tail, shape, span) for span in (len(tail) - 1, len(tail))) for name, shape in shapes.items()}
    closest = min(gaps, key=gaps.get)
    if gaps[closest] <= tolerance:
        return closest
    return "step" if (np.diff(tail) <= 0).all() and len(np.unique(tail)) <= 5 else "other"


def _gap(tail: np.ndarray, shape, span: int) -> float:
    """Largest distance, as a fraction of the drop, between an lr and shape(step / span) scaled to its first and last value.

    span len(tail) - 1: the shape ends at the last step; len(tail): one step later, as torch's schedulers do (the lr a
    step trained with is recorded, the one after the last is never used).
    """
    reference = shape(np.arange(len(tail)) / span)
    scaled = (reference - reference[-1]) / (reference[0] - reference[-1])
    return float(np.abs((tail - tail[-1]) / (tail[0] - tail[-1]) - scaled).max())
