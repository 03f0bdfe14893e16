"""Flagging many training examples at once (the undo button that takes it back is flagging.undo_button).

Every write goes to the flags store as one action of this session's actor (session.actor()): one
undo takes back a whole bulk flag, and never another tab's work.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import streamlit as st

from attribution_core.annotations import FLAG_KINDS
from attribution_core.evaluation.mislabel import MislabelRanking

from .core_calls import annotations, call_or_report
from .flagging import FLAG_ICONS, UNDO_KEY
from .session import actor


def suggestions(train_set, indices: Sequence[int], ranking: MislabelRanking | None) -> dict[int, int]:
    """{example id: the ranking's suggested class} for the examples at `indices` it suggests another class for."""
    if ranking is None:
        return {}
    suggested = {int(train_set.ids[int(index)]): ranking.suggestion(int(index), int(train_set.y[int(index)])) for index in indices}
    return {example_id: label for example_id, label in suggested.items() if label is not None}


def flag_many(run_id: str, train_set, indices: Sequence[int], kind: str, ranking: MislabelRanking | None = None) -> int:
    """Give the training examples at `indices` the verdict `kind` as one undoable action; returns how many were saved.

    ranking: the ranking whose suggested classes a "mislabeled" verdict saves (what cleanlab's and FiftyOne's exports carry).
    """
    ids = [int(train_set.ids[int(index)]) for index in indices]
    labels = suggestions(train_set, indices, ranking) if kind == "mislabeled" else None
    saved = call_or_report(annotations().set_flags, run_id, ids, kind, suggested_labels=labels, actor=actor())
    if saved is None:
        return 0
    st.toast(f"Flagged {len(saved)} example{'s' if len(saved) != 1 else ''} as {kind}. Press {UNDO_KEY} to undo.",
             icon=FLAG_ICONS[kind])
    return len(saved)


def kind_choice(*, key: str, label: str = "Flag as") -> str:
    """The verdict a bulk action gives (mislabeled first)."""
    return st.segmented_control(label, FLAG_KINDS, default=FLAG_KINDS[0], key=key, required=True,
                                format_func=str.capitalize)


def bulk_flag_button(run_id: str, train_set, indices: Sequence[int], kind: str, *, key: str, noun: str,
                     after: Callable[[], None] | None = None, ranking: MislabelRanking | None = None) -> None:
    """One button that gives every example in `indices` the verdict `kind` at once.

    Its label counts them ("Flag 12 selected"); the kind is in its icon and tooltip.

    `after` runs once they are saved (say, to clear a selection); the button is disabled when `indices` is empty;
    `ranking` as in flag_many.
    """
    def flag() -> None:
        if flag_many(run_id, train_set, indices, kind, ranking) and after is not None:
            after()

    st.button(f"Flag {len(indices)} {noun}", key=key, icon=FLAG_ICONS[kind], disabled=not len(indices), on_click=flag,
              help=f"Flag the {len(indices)} {noun} as {kind}: one action, undo takes all of them back")
