"""How training and test examples are described: class names, flag and mislabel marks, captions, and what a score means."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribution_core import inspection
from attribution_core.annotations import Flag
from attribution_core.api import METHODS
from attribution_core.data import Dataset
from attribution_core.methods.base import Method

from .images import GridItem

FLAG_COLOURS = {"mislabeled": "red", "ambiguous": "orange", "outlier": "violet", "fine": "green"}
"""Badge colour of each flag kind."""

UNREVIEWED = "not yet reviewed"
"""The verdict filter's name for examples without a verdict."""

NBSP = "\u00a0"
"""Joins words a narrow grid cell must not split across lines ("top 0.2%")."""


def class_name(dataset: Dataset, label: int) -> str:
    """The dataset's name of a class index."""
    return dataset.class_names[label]


def flipped_from(train_set: Dataset, index: int) -> int | None:
    """The original label of a training example whose label was flipped on purpose, else None."""
    if not train_set.flipped[index]:
        return None
    return int(train_set.original_y[index])


def marks(train_set: Dataset, index: int, flag: Flag | None) -> str:
    """Markdown badges of a training example: its flag, and a known flipped label ("flipped, was Dress")."""
    badges = []
    if flag is not None:
        badges.append(f":{FLAG_COLOURS[flag.kind]}-badge[:material/flag: {flag.kind}]")
    original = flipped_from(train_set, index)
    if original is not None:
        badges.append(f":orange-badge[:material/swap_horiz: flipped, was {class_name(train_set, original)}]")
    return " ".join(badges)


def verdicts(train_set: Dataset, flags: dict[int, Flag]) -> np.ndarray:
    """(N,) each training example's verdict kind, UNREVIEWED where it has none; flags: by example id."""
    return np.array([flags[int(i)].kind if int(i) in flags else UNREVIEWED for i in train_set.ids], dtype=object)


def number(value: float) -> str:
    """A score's size in three significant digits, in plain notation between 0.001 and 10,000 ('0.0541', '6.9e+03')."""
    size = abs(value)
    return f"{size:.3g}" if size == 0 or 1e-3 <= size < 1e4 else f"{size:.2e}"


def signed(value: float) -> str:
    """number() with its sign ('+0.0541', '−0.0277')."""
    return ("−" if value < 0 else "+") + number(value)


def share_text(share: float) -> str:
    """A share of the training set as a percentage: one decimal under 10 % ('0.2%'), whole above ('12%')."""
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


@dataclass(frozen=True)
class ScoreMeaning:
    """What one query's scores mean on a page, stated in its one unit.

    A method that estimates removal (Method.estimates_removal) scores the predicted drop of the
    query's margin if the example were removed; a similarity (TracIn, gradient dot/cosine,
    representation similarity) has no unit, so its scores show with their place among all training
    examples. values: (N,) the query's scores over the training set; class_label: whose margin.
    """

    method: str
    class_label: str
    values: np.ndarray

    @property
    def declared(self) -> type[Method]:
        """The method's class, with its label and declarations."""
        return METHODS[self.method]

    def place(self, index: int) -> str:
        """'top 0.2%' (or 'bottom 0.5%' in the lower half): where the example's score falls among all training examples."""
        n = len(self.values)
        rank = int(inspection.score_ranks(self.values, np.array([index]))[0])
        return f"top{NBSP}{share_text(rank / n)}" if rank <= n / 2 else f"bottom{NBSP}{share_text((n - rank + 1) / n)}"

    def cell(self, index: int) -> str:
        """The score as a grid cell shows it: bold, with its place for a similarity ('**+15.7** · top 0.2%')."""
        score = f"**{signed(float(self.values[index]))}**"
        return score if self.declared.estimates_removal else f"{score} · {self.place(index)}"

    def explanation(self, index: int) -> str:
        """One sentence on one example's score: what removing it would do, or its rank as a similarity."""
        value = float(self.values[index])
        n = len(self.values)
        rank = int(inspection.score_ranks(self.values, np.array([index]))[0])
        if self.declared.estimates_removal:
            direction = "lower" if value >= 0 else "raise"
            return (f"{signed(value)}: removing it would {direction} the margin of *{self.class_label}* by about {number(value)} "
                    f"({self.declared.label}'s estimate; rank {rank:,} of {n:,}).")
        return (f"{signed(value)}: {self.declared.label} similarity, rank {rank:,} of {n:,} ({self.place(index)}); "
                "a similarity ranks examples, its size is not a change of the margin.")

    def legend(self, *, largest: bool = True) -> str:
        """The one sentence above a grid of these scores, with the largest (or smallest) score as its example."""
        example = float(np.max(self.values) if largest else np.min(self.values))
        return score_legend(self.method, self.class_label, example, len(self.values))


def score_legend(method: str, class_label: str, example: float | None = None, n_train: int | None = None) -> str:
    """What the scores under a grid of training examples mean, in one sentence; method: its name (a label is accepted too).

    example: a score to spell the unit out with (say, the largest); n_train: how many examples a similarity ranks among.
    """
    declared = METHODS[method] if method in METHODS else next(spec for spec in METHODS.values() if spec.label == method)
    if declared.estimates_removal:
        spelled = "" if example is None else (
            f" {signed(example)}: removing it would {'lower' if example >= 0 else 'raise'} the margin by about {number(example)}.")
        return (f"Score: {declared.label}'s predicted drop of the margin of *{class_label}* if the example were removed from "
                f"training.{spelled}")
    among = "all training examples" if n_train is None else f"all {n_train:,} training examples"
    return (f"Score: {declared.label}'s similarity to this sample (higher = more alike, helping *{class_label}*), not a change "
            f"of the margin; beside it, its place among {among}.")


def train_item(train_set: Dataset, index: int, score: str | None, flag: Flag | None, *, tooltip: str | None = None) -> GridItem:
    """A grid cell for a training example with its score text (when there is one), given label and marks."""
    label = class_name(train_set, int(train_set.y[index]))
    score_text = "" if score is None else f"{score} · "
    caption = f"{score_text}{label}  \n#{index} {marks(train_set, index, flag)}"
    return GridItem(int(index), train_set.images[index], caption, tooltip)


def train_items(train_set: Dataset, indices: np.ndarray, values: np.ndarray | None, flags: dict, *,
                meaning: ScoreMeaning | None = None) -> list[GridItem]:
    """Grid cells for training examples (indices, and their scores or None) with their flags by example id.

    With `meaning` (the query's scores over the whole training set) each cell states its score in the
    meaning's unit (a similarity with its place) and its button's tooltip explains it; values is then ignored.
    """
    items = []
    for position, index in enumerate(indices):
        flag = flags.get(int(train_set.ids[index]))
        if meaning is not None:
            items.append(train_item(train_set, int(index), meaning.cell(int(index)), flag, tooltip=meaning.explanation(int(index))))
        else:
            items.append(train_item(train_set, int(index), None if values is None else f"**{float(values[position]):+.3g}**", flag))
    return items
