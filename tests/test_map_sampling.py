"""A map of more points than a browser draws well: a fixed sample is drawn, and a box or lasso still selects among all points."""
from __future__ import annotations

import numpy as np

from app.components import charts, embedding


def test_a_map_within_the_limit_draws_every_point(monkeypatch):
    monkeypatch.setattr(embedding, "MAX_DRAWN", 100)
    assert embedding.drawn_mask(100).all()


def test_a_larger_map_draws_the_same_sample_each_time_and_every_point_it_must_keep(monkeypatch):
    monkeypatch.setattr(embedding, "MAX_DRAWN", 100)
    keep = np.array([3, 999])
    first, again = embedding.drawn_mask(1000, keep), embedding.drawn_mask(1000, keep)
    assert (first == again).all() and first[keep].all()
    assert 100 <= first.sum() <= 102 and embedding.drawn_mask(1000).sum() == 100


def test_a_box_on_a_sampled_map_chooses_the_undrawn_training_examples_inside_it_too():
    positions = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.5, 0.2]])
    selection = {"points": [{"customdata": ["train", 1]}, {"customdata": ["test", 7]}],
                 "box": [{"x": [-0.1, 1.1], "y": [1.1, -0.1]}], "lasso": []}
    assert embedding.chosen_examples(selection, positions) == {"train": [0, 1, 3], "test": [7]}
    assert embedding.chosen_examples(selection) == {"train": [1], "test": [7]}, "a map of every point: what plotly reports"


def test_a_lasso_on_a_sampled_map_chooses_the_training_examples_inside_it():
    positions = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.5, 0.2]])
    selection = {"points": [], "box": [], "lasso": [{"x": [-1, 2, -1], "y": [-1, -1, 2]}]}
    assert embedding.chosen_examples(selection, positions) == {"train": [0, 3], "test": []}


def test_sampled_scores_are_coloured_by_their_rank_among_all_scores():
    values = np.array([0.5, -3.0, 0.1, 2.0, -0.2, 4.0])
    drawn = np.array([1, 3, 5])
    assert np.allclose(charts.rank_colours(values[drawn], among=values), charts.rank_colours(values)[drawn])
    assert np.allclose(charts.rank_colours(values[drawn], among=values), [-0.8, 0.6, 1.0])
