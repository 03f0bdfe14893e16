"""Filtering and sorting a page's grids of training examples by verdict, given class and score (Explore's results)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from attribution_core.annotations import FLAG_KINDS, Flag
from attribution_core.data import Dataset

from .examples import UNREVIEWED, class_name, verdicts

SORTS = ("score", "given class", "verdict")
"""How a grid's examples can be ordered: by score (strongest first), given class name, or verdict (FLAG_KINDS order, unreviewed last)."""


@dataclass(frozen=True)
class ReviewFilter:
    """Which training examples a grid may show, keep: (N,) bool, and how it orders the ones it shows."""

    keep: np.ndarray
    sort: str
    kinds: np.ndarray
    """(N,) each example's verdict (examples.verdicts), for sorting."""

    def ordered(self, train_set: Dataset, indices: np.ndarray) -> np.ndarray:
        """The grid's examples (in score order) in the chosen order; ties keep score order."""
        if self.sort == "given class":
            return np.array(sorted(indices, key=lambda index: class_name(train_set, int(train_set.y[index]))), dtype=int)
        if self.sort == "verdict":
            rank = {kind: position for position, kind in enumerate((*FLAG_KINDS, UNREVIEWED))}
            return np.array(sorted(indices, key=lambda index: rank[self.kinds[index]]), dtype=int)
        return np.asarray(indices, dtype=int)


def review_filters(train_set: Dataset, flags: dict[int, Flag], *, key: str) -> ReviewFilter:
    """The verdict, given-class and sort controls of a pair of grids (keys `{key}_show`, `{key}_classes`, `{key}_sort`)."""
    n_classes = len(train_set.class_names)
    show_column, class_column, sort_column = st.columns([2.8, 1.3, 0.9], vertical_alignment="bottom")
    shown = show_column.pills(
        "Show", (UNREVIEWED, *FLAG_KINDS), selection_mode="multi", default=[], key=f"{key}_show", width="stretch",
        help="Only examples not yet reviewed, or with these verdicts (none chosen: all). The grids then show the strongest among them.")
    classes = class_column.multiselect("Given class", range(n_classes), format_func=lambda label: class_name(train_set, label),
                                       key=f"{key}_classes", placeholder="any")
    sort = sort_column.selectbox("Order by", SORTS, key=f"{key}_sort", help="Within the examples shown: by score, given class or verdict.")
    kinds = verdicts(train_set, flags)
    keep = np.ones(len(train_set), dtype=bool)
    if shown:
        keep &= np.isin(kinds, list(shown))
    if classes:
        keep &= np.isin(train_set.y.numpy(), classes)
    return ReviewFilter(keep, sort, kinds)
