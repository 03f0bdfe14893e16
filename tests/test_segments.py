"""SOURCE's segment planning: even splits within stages, explicit ranges, and η̄K from the trajectory."""
from __future__ import annotations

import math

import numpy as np
import pytest

from attribution_core.errors import DataError, SettingsError
from attribution_core.numerics.segments import plan_segments


def plan(steps, stages, lrs, *, momenta=None, optimizers=None, **options):
    """plan_segments with zero momentum and SGD unless given."""
    n_steps = len(lrs)
    return plan_segments(
        steps,
        stages,
        np.asarray(lrs, dtype=float),
        np.zeros(n_steps) if momenta is None else np.asarray(momenta, dtype=float),
        ["sgd"] * n_steps if optimizers is None else optimizers,
        **options,
    )


def schedule(lr_of_step, n_steps: int) -> np.ndarray:
    """Per-step learning rates (index i = step i + 1) from a formula of the 1-based step."""
    return np.array([lr_of_step(step) for step in range(1, n_steps + 1)])


def indices(split) -> list[list[int]]:
    return [segment.checkpoint_indices for segment in split.segments]


def test_checkpoints_split_evenly_and_earlier_segments_take_the_remainder():
    assert indices(plan([1, 2, 3, 4, 5, 6], [0] * 6, np.ones(6), n_segments=3)) == [[0, 1], [2, 3], [4, 5]]
    assert indices(plan(list(range(1, 8)), [0] * 7, np.ones(7), n_segments=3)) == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("stages", [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 1, 1, 2, 2, 2, 2]])
def test_segments_never_cross_a_stage_boundary(stages):
    n = len(stages)
    for n_segments in range(len(set(stages)), n + 1):
        split = plan(list(range(1, n + 1)), stages, np.ones(n), n_segments=n_segments)
        assert len(split.segments) == n_segments
        assert [i for segment in indices(split) for i in segment] == list(range(n))
        assert all(len({stages[i] for i in segment}) == 1 for segment in indices(split))


def test_segments_go_to_the_stage_with_the_longest_segments():
    assert indices(plan(list(range(1, 7)), [0, 0, 0, 0, 1, 1], np.ones(6), n_segments=3)) == [[0, 1], [2, 3], [4, 5]]
    assert indices(plan(list(range(1, 7)), [0, 0, 0, 0, 0, 1], np.ones(6), n_segments=3)) == [[0, 1, 2], [3, 4], [5]]


@pytest.mark.parametrize("n_segments", [1, 7])
def test_impossible_segment_counts_are_rejected(n_segments):
    with pytest.raises(SettingsError, match="n_segments"):
        plan(list(range(1, 7)), [0, 0, 0, 1, 1, 1], np.ones(6), n_segments=n_segments)


def test_step_schedule_lr_sums_cover_each_segments_steps():
    lrs = schedule(lambda step: 0.1 * 0.5 ** ((step - 1) // 4), 12)  # halved every 4 steps
    split = plan([4, 8, 12], [0, 0, 0], lrs, n_segments=3)
    assert [(s.first_step, s.last_step) for s in split.segments] == [(1, 4), (5, 8), (9, 12)]
    assert [s.lr_sum for s in split.segments] == pytest.approx([0.4, 0.2, 0.1])


def test_cosine_schedule_lr_sums_add_up_to_the_closed_form():
    total, base = 40, 0.2
    lrs = schedule(lambda step: base * 0.5 * (1 + math.cos(math.pi * (step - 1) / total)), total)
    split = plan([10, 20, 30, 40], [0] * 4, lrs, n_segments=2)
    first = sum(base * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(20))
    assert split.segments[0].lr_sum == pytest.approx(first)
    # Σ_{t<T} cos(πt/T) = 1 (the terms t and T − t cancel), so the whole run sums to base (T + 1) / 2
    assert sum(s.lr_sum for s in split.segments) == pytest.approx(base * (total + 1) / 2)


def test_warm_up_counts_exactly_and_momentum_scales_sgd_steps():
    lrs = schedule(lambda step: 0.1 * min(step / 10, 1.0), 20)  # linear warm-up over 10 steps
    split = plan([5, 10, 15, 20], [0] * 4, lrs, momenta=np.full(20, 0.9), n_segments=2)
    assert [s.lr_sum for s in split.segments] == pytest.approx([0.1 * 5.5 / 0.1, 0.1 * 10 / 0.1])
    assert split.notes == []


def test_steps_before_the_first_checkpoint_count_and_steps_after_the_last_do_not():
    split = plan([3, 6], [0, 0], np.ones(10), n_segments=1)
    assert (split.segments[0].first_step, split.segments[0].last_step, split.segments[0].lr_sum) == (1, 6, 6.0)


def test_adam_steps_use_the_plain_lr_sum_with_a_note():
    optimizers = ["sgd"] * 4 + ["adam"] * 4
    split = plan([4, 8], [0, 1], np.ones(8), momenta=np.full(8, 0.5), optimizers=optimizers, n_segments=2)
    assert [s.lr_sum for s in split.segments] == pytest.approx([8.0, 4.0])
    assert len(split.notes) == 1 and "adam" in split.notes[0] and "SGD" in split.notes[0]


def test_explicit_ranges_are_used_as_given():
    split = plan(list(range(1, 7)), [0, 0, 0, 1, 1, 1], np.ones(6), ranges=[(0, 1), (1, 3), (3, 6)])
    assert indices(split) == [[0], [1, 2], [3, 4, 5]]
    assert [s.lr_sum for s in split.segments] == pytest.approx([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([(0, 2), (3, 6)], "contiguous"),
        ([(0, 3), (2, 6)], "contiguous"),
        ([(1, 3), (3, 6)], "contiguous"),
        ([(0, 0), (0, 6)], "non-empty"),
        ([(0, 3)], "cover all 6"),
        ([(0, 4), (4, 6)], "crosses a training stage boundary"),
        ([], "at least one"),
    ],
)
def test_invalid_explicit_ranges_are_rejected_with_a_reason(ranges, message):
    with pytest.raises(SettingsError, match=message):
        plan(list(range(1, 7)), [0, 0, 0, 1, 1, 1], np.ones(6), ranges=ranges)


@pytest.mark.parametrize(
    "steps, stages, n_steps",
    [([2, 2], [0, 0], 4), ([2, 5], [0, 0], 4), ([1, 2], [1, 0], 4), ([1, 2], [0], 4), ([], [], 4)],
)
def test_inconsistent_trajectories_are_rejected(steps, stages, n_steps):
    with pytest.raises(DataError, match="inconsistent training trajectory"):
        plan(steps, stages, np.ones(n_steps), n_segments=1)
