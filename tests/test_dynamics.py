"""Training dynamics from the record: AUM, forgetting, data map, early windows and epochs against values computed by hand."""
from __future__ import annotations

import numpy as np

from attribution_core.evaluation import dynamics
from attribution_core.runs.record import TrainingRecord

# Three epochs over examples 0-3 (example 4 is never drawn), two batches of two per epoch.
BATCHES = [[0, 1], [2, 3], [3, 0], [1, 2], [2, 1], [0, 3]]
MARGINS = {0: [1.0, -1.0, 2.0], 1: [-1.0, -2.0, -0.5], 2: [1.0, 1.0, 1.0], 3: [0.5, -0.5, -1.0]}
"""Each example's margin at its draws 1, 2, 3 (epochs 0, 1, 2)."""
PROBABILITIES = {0: [0.5, 0.25, 0.75], 1: [0.1, 0.1, 0.1], 2: [0.9, 0.6, 0.3], 3: [0.8, 0.4, 0.6]}
"""Each example's p(label) = exp(−loss) at its draws."""


def hand_record() -> TrainingRecord:
    """The record of BATCHES with the losses −log p and the margins above, one stage."""
    indices = np.array([row for batch in BATCHES for row in batch])
    draw_number = {row: 0 for row in MARGINS}
    losses, margins = [], []
    for row in indices:
        losses.append(-np.log(PROBABILITIES[row][draw_number[row]]))
        margins.append(MARGINS[row][draw_number[row]])
        draw_number[row] += 1
    steps = len(BATCHES)
    return TrainingRecord(
        stage=np.zeros(steps, dtype=np.int64), lr=np.ones(steps), momentum=np.zeros(steps), beta2=np.zeros(steps),
        weight_decay=np.zeros(steps), batch_size=np.full(steps, 2), optimizer=["sgd"] * steps, indices=indices,
        losses=np.array(losses, dtype=np.float32), margins=np.array(margins, dtype=np.float32),
    )


N = 5


def test_area_under_margin_is_each_examples_mean_margin_by_hand():
    expected = [(1 - 1 + 2) / 3, (-1 - 2 - 0.5) / 3, 1.0, (0.5 - 0.5 - 1) / 3, np.nan]
    np.testing.assert_allclose(dynamics.area_under_margin(hand_record(), N), expected, rtol=1e-6)


def test_forgetting_counts_correct_to_incorrect_and_never_learned_is_infinite():
    # 0: + - + (one event); 1: never > 0 (never learned); 2: + + +; 3: + - - (one event); 4: never drawn.
    np.testing.assert_array_equal(dynamics.forgetting_events(hand_record(), N), [1, np.inf, 0, 1, np.nan])
    scores = dynamics.signal_scores(hand_record(), N, "forgetting")
    np.testing.assert_array_equal(scores, [1, 2, 0, 1, 0])  # never learned above every count; never drawn lowest


def test_learning_time_is_the_share_of_draws_before_the_margin_stays_positive():
    # 0: + - + (learned for good at draw 3: 2 of 3 draws before); 1: never > 0 (all 3); 2: + + + (none);
    # 3: + - - (wrong at its last draw: all 3); 4: never drawn.
    np.testing.assert_array_equal(dynamics.learning_time(hand_record(), N), [2 / 3, 1, 0, 1, np.nan])


def test_a_draw_whose_loss_rounded_to_zero_counts_as_fitted_at_the_largest_resolved_margin():
    record = hand_record()
    last = np.flatnonzero(record.indices == 2)[-1]  # example 2's third draw: p(label) 0.3, margin 1
    record.losses[last], record.margins[last] = 0.0, np.inf  # a float32 loss below its resolution, as a memorised example's
    largest = 2.0  # the record's largest finite margin: example 0's third draw
    np.testing.assert_allclose(dynamics.area_under_margin(record, N)[2], (1 + 1 + largest) / 3, rtol=1e-6)
    confidence, _ = dynamics.data_map(record, N)
    np.testing.assert_allclose(confidence[2], (0.9 + 0.6 + 1.0) / 3, rtol=1e-6)
    assert dynamics.forgetting_events(record, N)[2] == 0 and dynamics.learning_time(record, N)[2] == 0


def test_data_map_is_the_mean_and_population_std_of_p_label_by_hand():
    confidence, variability = dynamics.data_map(hand_record(), N)
    np.testing.assert_allclose(confidence[:4], [0.5, 0.1, 0.6, 0.6], rtol=1e-6)
    np.testing.assert_allclose(variability[:4], np.sqrt([(0 + 0.0625 + 0.0625) / 3, 0, (0.09 + 0 + 0.09) / 3, (0.04 + 0.04 + 0) / 3]),
                               rtol=1e-5, atol=1e-7)
    assert np.isnan(confidence[4]) and np.isnan(variability[4])


def test_early_window_takes_a_share_of_the_draws_with_a_floor_and_skips_the_first():
    first, stop = dynamics.early_window(np.array([0, 1, 2, 3, 25, 150]))  # a tenth, at least 10 draws
    np.testing.assert_array_equal(first, [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(stop, [0, 1, 2, 3, 10, 15])
    _, stop = dynamics.early_window(np.array([150]), fraction=0.5, min_draws=1)
    np.testing.assert_array_equal(stop, [75])


def test_early_signals_average_draws_two_and_three_by_hand():
    record = hand_record()
    p = {row: values[1:] for row, values in PROBABILITIES.items()}  # three draws: the window is draws 2-3
    np.testing.assert_allclose(dynamics.early_loss(record, N)[:4], [-np.log(p[row]).mean() for row in range(4)], rtol=1e-6)
    np.testing.assert_allclose(dynamics.early_self_confidence(record, N)[:4], [np.mean(p[row]) for row in range(4)], rtol=1e-6)
    np.testing.assert_allclose(dynamics.early_margin(record, N)[:4], [np.mean(MARGINS[row][1:]) for row in range(4)], rtol=1e-6)
    only_second = dynamics.early_loss(record, N, fraction=0.5, min_draws=1)  # ceil(1.5) = 2 draws, less the first
    np.testing.assert_allclose(only_second[:4], [-np.log(p[row][0]) for row in range(4)], rtol=1e-6)


def test_top_shares_average_ties_and_the_combination_averages_them():
    np.testing.assert_allclose(dynamics.top_shares(np.array([3.0, 1.0, 3.0, 2.0])), [1.5 / 4, 1, 1.5 / 4, 3 / 4])
    record = hand_record()
    shares = [dynamics.top_shares(dynamics.signal_scores(record, N, name)) for name in dynamics.COMBINED]
    np.testing.assert_allclose(dynamics.combined(record, N), 1 - np.mean(shares, axis=0))


def test_every_signal_is_finite_and_deterministic_and_never_drawn_is_least_suspicious():
    record = hand_record()
    for name in dynamics.SIGNALS:
        scores = dynamics.signal_scores(record, N, name)
        assert np.isfinite(scores).all(), name
        assert scores[4] == scores.min(), name
        np.testing.assert_array_equal(scores, dynamics.signal_scores(hand_record(), N, name))


def test_epochs_count_each_stage_pass_and_curves_follow_them():
    # stage 0: rows 0-3, two epochs of batches of 3 (3 + 1 per epoch); stage 1: rows 0 and 2, two epochs of one batch.
    batches = [[2, 0, 1], [3], [1, 3, 0], [2], [2, 0], [0, 2]]
    indices = np.array([row for batch in batches for row in batch])
    losses = np.arange(len(indices), dtype=np.float32)
    record = TrainingRecord(
        stage=np.array([0, 0, 0, 0, 1, 1]), lr=np.ones(6), momentum=np.zeros(6), beta2=np.zeros(6), weight_decay=np.zeros(6),
        batch_size=np.array([len(batch) for batch in batches]), optimizer=["sgd"] * 6, indices=indices,
        losses=losses, margins=-losses,
    )
    np.testing.assert_array_equal(dynamics.epochs(record), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    shown, values = dynamics.training_curve(record, 0)
    np.testing.assert_array_equal(shown, [0, 1, 2, 3])
    np.testing.assert_array_equal(values, [1, 6, 9, 10])  # example 0's losses, one draw per epoch
    shown, values = dynamics.training_curve(record, 3, "margins")
    np.testing.assert_array_equal(shown, [0, 1])
    np.testing.assert_array_equal(values, [-3, -5])


def test_a_record_without_losses_has_no_dynamics():
    record = hand_record()
    assert dynamics.has_dynamics(record) and not dynamics.has_dynamics(None)
    record.losses[:] = np.nan
    assert not dynamics.has_dynamics(record)
