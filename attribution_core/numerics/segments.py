"""SOURCE's segments: which checkpoints each stretch of training averages over, and its η̄K.

Pure functions of the recorded trajectory (no models). Inputs, all from a run's record:
- checkpoint_steps: the optimizer step after which each checkpoint was saved (1-based step
  counts, strictly increasing), checkpoint_stages: the training stage of each checkpoint;
- per-step arrays (index i = step i + 1): learning rates, momenta and optimizer names.

Segment ℓ covers the optimizer steps from one past the previous segment's last checkpoint
(step 1 for the first segment) up to its own last checkpoint, and its lr_sum is η̄_ℓ K_ℓ: the sum
of those steps' learning rates, each divided by (1 − momentum) for SGD (heavy-ball momentum
multiplies a stationary step by 1/(1 − β)). Other optimizers (Adam) get the plain sum and a note:
SOURCE's closed form assumes SGD.

Segments never cross a stage boundary: within a segment the Hessian and gradients are treated as
stationary, which a change of data or optimizer breaks.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError, SettingsError

SGD = "sgd"


@dataclass(frozen=True)
class SegmentPlan:
    """One segment: its checkpoints (indices into the run's checkpoint list), steps and η̄K."""

    checkpoint_indices: list[int]
    first_step: int
    last_step: int
    lr_sum: float


@dataclass(frozen=True)
class SegmentSplit:
    """The segments of a run, oldest first, and notes to show the user (e.g. a non-SGD optimizer)."""

    segments: list[SegmentPlan]
    notes: list[str] = field(default_factory=list)


def stage_runs(checkpoint_stages: Sequence[int]) -> list[range]:
    """Checkpoint index ranges of consecutive checkpoints with the same stage, in order."""
    runs, start = [], 0
    for index in range(1, len(checkpoint_stages) + 1):
        if index == len(checkpoint_stages) or checkpoint_stages[index] != checkpoint_stages[start]:
            runs.append(range(start, index))
            start = index
    return runs


def segments_per_stage(stage_sizes: Sequence[int], n_segments: int) -> list[int]:
    """How many segments each stage gets: at least one, at most its checkpoints, sizes kept even.

    Every stage starts with one segment; each further segment goes to the stage whose segments
    currently hold the most checkpoints each (the earliest such stage on ties), so the segment
    lengths come out as equal as the stage boundaries allow.
    """
    if not len(stage_sizes) <= n_segments <= sum(stage_sizes):
        raise SettingsError(
            f"n_segments={n_segments}: need between {len(stage_sizes)} (one per training stage; segments "
            f"never cross a stage boundary) and {sum(stage_sizes)} (one per checkpoint)"
        )
    counts = [1] * len(stage_sizes)
    for _ in range(n_segments - len(stage_sizes)):
        open_stages = [s for s, size in enumerate(stage_sizes) if counts[s] < size]
        counts[max(open_stages, key=lambda s: stage_sizes[s] / counts[s])] += 1
    return counts


def even_ranges(checkpoint_stages: Sequence[int], n_segments: int) -> list[tuple[int, int]]:
    """Default split: (lo, hi) half-open checkpoint ranges, even within each stage.

    A stage's checkpoints are split into its segments (segments_per_stage) as evenly as possible;
    when they do not divide, the earlier segments get one checkpoint more, so the stretch nearest
    the final model is the finest.
    """
    runs = stage_runs(checkpoint_stages)
    ranges = []
    for run, count in zip(runs, segments_per_stage([len(run) for run in runs], n_segments)):
        sizes = [len(part) for part in np.array_split(np.arange(len(run)), count)]
        bounds = run.start + np.concatenate([[0], np.cumsum(sizes)])
        ranges += [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return ranges


def check_ranges(ranges: Sequence[tuple[int, int]], checkpoint_stages: Sequence[int]) -> None:
    """Raise SettingsError unless the half-open ranges tile 0..C in order within stages."""
    n_checkpoints = len(checkpoint_stages)
    if not ranges:
        raise SettingsError("segments=[]: give at least one (lo, hi) checkpoint range, or None for the default split")
    expected_lo = 0
    for lo, hi in ranges:
        if lo != expected_lo or hi <= lo:
            raise SettingsError(
                f"segments={list(ranges)}: ranges are half-open checkpoint index ranges (lo, hi) that must be "
                f"non-empty, in order and contiguous from 0; ({lo}, {hi}) should start at {expected_lo}"
            )
        if len(set(checkpoint_stages[lo:hi])) > 1:
            raise SettingsError(
                f"segments={list(ranges)}: range ({lo}, {hi}) crosses a training stage boundary (checkpoint "
                f"stages {list(checkpoint_stages[lo:hi])}); SOURCE segments must lie within one stage"
            )
        expected_lo = hi
    if expected_lo != n_checkpoints:
        raise SettingsError(f"segments={list(ranges)}: ranges must cover all {n_checkpoints} checkpoints (end at {n_checkpoints})")


def _check_trajectory(
    checkpoint_steps: Sequence[int],
    checkpoint_stages: Sequence[int],
    learning_rates: np.ndarray,
    momenta: np.ndarray,
    optimizers: Sequence[str],
) -> None:
    steps = np.asarray(checkpoint_steps)
    problems = []
    if len(steps) == 0 or len(steps) != len(checkpoint_stages):
        problems.append(f"{len(steps)} checkpoint steps for {len(checkpoint_stages)} checkpoint stages (need one each, at least one)")
    elif steps[0] < 1 or np.any(np.diff(steps) <= 0) or steps[-1] > len(learning_rates):
        problems.append(f"checkpoint steps {list(steps)} must increase strictly within 1..{len(learning_rates)} (the recorded steps)")
    if np.any(np.diff(np.asarray(checkpoint_stages)) < 0):
        problems.append(f"checkpoint stages {list(checkpoint_stages)} must not decrease")
    if not len(learning_rates) == len(momenta) == len(optimizers):
        problems.append(f"per-step records differ in length: {len(learning_rates)} lrs, {len(momenta)} momenta, "
                        f"{len(optimizers)} optimizers")
    if problems:
        raise DataError("inconsistent training trajectory: " + "; ".join(problems))


def step_weights(learning_rates: np.ndarray, momenta: np.ndarray, optimizers: Sequence[str]) -> np.ndarray:
    """Each step's contribution to η̄K (n_steps,): lr / (1 − momentum) for SGD, plain lr otherwise."""
    is_sgd = np.array([name.lower() == SGD for name in optimizers], dtype=bool)
    return np.where(is_sgd, learning_rates / (1 - np.where(is_sgd, momenta, 0.0)), learning_rates)


def plan_segments(
    checkpoint_steps: Sequence[int],
    checkpoint_stages: Sequence[int],
    learning_rates: np.ndarray,
    momenta: np.ndarray,
    optimizers: Sequence[str],
    *,
    n_segments: int = 3,
    ranges: Sequence[tuple[int, int]] | None = None,
) -> SegmentSplit:
    """SOURCE's segments from a trajectory: the default even split, or explicit half-open ranges.

    checkpoint_steps, checkpoint_stages: (C,) per checkpoint; learning_rates, momenta,
    optimizers: (n_steps,) per optimizer step, index i = step i + 1. ranges, when given, are
    half-open checkpoint index ranges [(lo, hi), ...] tiling 0..C in order (n_segments is then
    ignored).
    """
    learning_rates, momenta = np.asarray(learning_rates, dtype=float), np.asarray(momenta, dtype=float)
    _check_trajectory(checkpoint_steps, checkpoint_stages, learning_rates, momenta, optimizers)
    if ranges is None:
        ranges = even_ranges(checkpoint_stages, n_segments)
    check_ranges(ranges, checkpoint_stages)
    weights = step_weights(learning_rates, momenta, optimizers)
    segments, previous_step = [], 0
    for lo, hi in ranges:
        last_step = int(checkpoint_steps[hi - 1])
        lr_sum = float(weights[previous_step:last_step].sum())
        segments.append(SegmentPlan(list(range(lo, hi)), previous_step + 1, last_step, lr_sum))
        previous_step = last_step
    return SegmentSplit(segments, _optimizer_notes(optimizers[: previous_step]))


def _optimizer_notes(optimizers: Sequence[str]) -> list[str]:
    others = sorted({name for name in optimizers if name.lower() != SGD})
    if not others:
        return []
    return [
        f"the run used {', '.join(others)}: SOURCE assumes SGD, so its η̄K is the plain sum of learning rates "
        "for those steps (no adaptive preconditioner); treat its scores as approximate"
    ]
