"""How training and test examples are described: class names, flag and mislabel marks, captions."""
from __future__ import annotations

import numpy as np

from attribution_core.annotations import Flag
from attribution_core.data import Dataset

from .images import GridItem

FLAG_COLOURS = {"mislabeled": "red", "ambiguous": "orange", "outlier": "violet", "fine": "green"}
"""Badge colour of each flag kind."""


def class_name(dataset: Dataset, label: int) -> str:
    """The dataset's name of a class index."""
    return dataset.class_names[label]


def flipped_from(train_set: Dataset, index: int) -> int | None:
    """The original label of a training example whose label was flipped on purpose, else None."""
    if not train_set.flipped[index]:
        return None
    return int(train_set.original_y[index])


def marks(train_set: Dataset, index: int, flag: Flag | None) -> str:
    """Markdown badges of a training example: its flag, and a known flipped label."""
    badges = []
    if flag is not None:
        badges.append(f":{FLAG_COLOURS[flag.kind]}-badge[:material/flag: {flag.kind}]")
    original = flipped_from(train_set, index)
    if original is not None:
        badges.append(f":orange-badge[:material/swap_horiz: flipped, was {class_name(train_set, original)}]")
    return " ".join(badges)


def train_item(train_set: Dataset, index: int, score: float | None, flag: Flag | None) -> GridItem:
    """A grid cell for a training example with its score (when there is one), given label and marks."""
    label = class_name(train_set, int(train_set.y[index]))
    score_text = "" if score is None else f"**{score:+.3g}** · "
    caption = f"{score_text}{label}  \n#{index} {marks(train_set, index, flag)}"
    return GridItem(int(index), train_set.images[index], caption)


def score_legend(method_label: str, class_label: str) -> str:
    """What the scores under a grid of training examples mean: their unit and their sign (the core's one convention)."""
    return (f"Scores: {method_label}'s estimate of the change in the margin of *{class_label}* (its log-odds) from training on "
            f"the example; positive = raised the margin of *{class_label}*, negative = lowered it.")


def train_items(train_set: Dataset, indices: np.ndarray, values: np.ndarray | None, flags: dict) -> list[GridItem]:
    """Grid cells for training examples (indices, and their scores or None) with their flags by example id."""
    return [
        train_item(train_set, int(index), None if values is None else float(values[position]), flags.get(int(train_set.ids[index])))
        for position, index in enumerate(indices)
    ]
