"""The Map page's 2-D layout: UMAP of the penultimate-layer representations of training and test examples, laid out by a job."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attribution_core.inspection import MapLayout, inside_box, inside_polygon
from attribution_core.jobs.kinds import layout_job
from attribution_core.runs.run import Run

from .jobs import job_result


def embedding(run: Run, checkpoint: int, *, container=None) -> MapLayout | None:
    """The stored map of a checkpoint, or None while its job lays it out (its progress panel shown)."""
    return job_result(run, layout_job(run, checkpoint), container=container)


MAX_DRAWN = 100_000
"""Points of one split the map draws at most. Beyond, it draws a fixed random sample of them with every point it must show (the
verdicts, the strongest scores, the linked example), says so, and a box or lasso selects among all of them (chosen_examples):
the figure of 600,000 points is 44 MB of JSON, 3.3 s to write on every page run before the browser reads it (100,000: 7 MB, 0.7 s)."""


def drawn_mask(n: int, keep: np.ndarray | None = None) -> np.ndarray:
    """(n,) which of a split's n points the map draws: all of them up to MAX_DRAWN, else a fixed random MAX_DRAWN and `keep`."""
    if n <= MAX_DRAWN:
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(0).choice(n, MAX_DRAWN, replace=False)] = True
    if keep is not None:
        mask[keep] = True
    return mask


def in_region(positions: np.ndarray, selection: Mapping[str, Any]) -> np.ndarray:
    """(n,) whether each position lies in one of the selection's boxes or lassos (plotly's data coordinates)."""
    inside = np.zeros(len(positions), dtype=bool)
    for box in selection.get("box", []):
        if len(box.get("x", [])) == 2 and len(box.get("y", [])) == 2:
            inside |= inside_box(positions, box["x"], box["y"])
    for lasso in selection.get("lasso", []):
        inside |= inside_polygon(positions, lasso.get("x", []), lasso.get("y", []))
    return inside


def chosen_examples(selection: Mapping[str, Any], sampled_train: np.ndarray | None = None) -> dict[str, list[int]]:
    """{"train": indices, "test": indices} a plotly selection chose: the points it reports (customdata (split, index)).

    sampled_train: the training positions (N, 2) of a map that draws a sample of them: a box or lasso then also chooses
    every training example inside it that was not drawn (plotly reports only drawn points).
    """
    points = selection.get("points", [])
    chosen = {split: {int(point["customdata"][1]) for point in points if point.get("customdata", [None])[0] == split}
              for split in ("train", "test")}
    if sampled_train is not None:
        chosen["train"] |= set(np.flatnonzero(in_region(sampled_train, selection)).tolist())
    return {split: sorted(indices) for split, indices in chosen.items()}
