"""Flagging a training example: one button per verdict, saved to annotations.sqlite at once."""
from __future__ import annotations

import streamlit as st

from attribution_core.annotations import FLAG_KINDS

from .core_calls import annotations, call_or_report
from .examples import FLAG_COLOURS, class_name

FLAG_ICONS = {"mislabeled": ":material/label_off:", "ambiguous": ":material/help:", "outlier": ":material/scatter_plot:",
              "fine": ":material/check_circle:"}
"""Button icon of each flag kind."""


def flag_controls(
    run_id: str,
    train_set,
    index: int,
    *,
    key: str,
    suggested_label: int | None = None,
    shortcuts: dict[str, str] | None = None,
    per_row: int = 4,
) -> str | None:
    """Verdict buttons for training example `index`; returns the kind saved on this run, if any.

    The mislabeled verdict stores the suggested label chosen in the selectbox (preset to
    `suggested_label`), every verdict stores the note. `shortcuts` maps a kind to a key ("M");
    the buttons come `per_row` to a row.
    """
    example_id = int(train_set.ids[index])
    flag = annotations().flags(run_id).get(example_id)
    if flag is not None:
        st.markdown(f"Current verdict: :{FLAG_COLOURS[flag.kind]}-badge[:material/flag: {flag.kind}]"
                    + (f" → {class_name(train_set, flag.suggested_label)}" if flag.suggested_label is not None else ""))
    n_classes = len(train_set.class_names)
    preset = flag.suggested_label if flag is not None and flag.suggested_label is not None else suggested_label
    left, right = st.columns(2)
    suggestion = left.selectbox(
        "Suggested label (saved with 'mislabeled')", range(n_classes), key=f"{key}_suggested",
        index=preset if preset is not None and 0 <= preset < n_classes else int(train_set.y[index]),
        format_func=lambda label: class_name(train_set, label),
    )
    note = right.text_input("Note", value=flag.note if flag is not None else "", key=f"{key}_note", max_chars=500)
    pressed = None
    columns = [column for start in range(0, len(FLAG_KINDS), per_row) for column in st.columns(per_row)]
    for column, kind in zip(columns, FLAG_KINDS):
        if column.button(kind.capitalize(), key=f"{key}_{kind}", icon=FLAG_ICONS[kind], width="stretch",
                         shortcut=(shortcuts or {}).get(kind), type="primary" if flag is not None and flag.kind == kind else "secondary"):
            pressed = kind
    if pressed is None:
        return None
    saved = call_or_report(
        annotations().set_flag, run_id, example_id, pressed,
        suggested_label=int(suggestion) if pressed == "mislabeled" else None, note=note,
    )
    return None if saved is None else pressed
