"""Flagging a training example: one button per verdict, saved to annotations.sqlite at once as this tab's action."""
from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from attribution_core.annotations import FLAG_KINDS

from .core_calls import annotations, call_or_report
from .examples import FLAG_COLOURS, class_name
from .session import actor

FLAG_ICONS = {"mislabeled": ":material/label_off:", "ambiguous": ":material/help:", "outlier": ":material/scatter_plot:",
              "fine": ":material/check_circle:"}
"""Button icon of each flag kind."""

VERDICT_KEYS = {"mislabeled": "M", "ambiguous": "A", "outlier": "O", "fine": "F"}
"""Keyboard shortcut of each verdict's button wherever verdicts are given from the keyboard (Explore's and the Map's dialogs, Mislabels)."""

UNDO_KEY = "U"
"""Keyboard shortcut of the undo button (a letter, like the review keys; Streamlit reserves C and R)."""

UNDO_HINT = f"Undo ({UNDO_KEY}) takes it back."
"""What a toast after a flag write says about undo."""

TOAST_KEY = "flag_toast"
"""Session state: (message, icon) of the toast a flag callback asked for, shown by the next show_pending_toast."""


def announce(message: str, icon: str) -> None:
    """Ask for a toast from a callback; show_pending_toast shows it from the page or dialog body.

    Streamlit 1.67's page breaks ("'setIn' cannot be called on an ElementNode") when a callback that
    reruns a dialog alone (a fragment) calls st.toast itself; the same toast from the body is fine.
    """
    st.session_state[TOAST_KEY] = (message, icon)


def show_pending_toast() -> None:
    """Show the toast a flag callback asked for, once (call it where the page or a dialog draws)."""
    pending = st.session_state.pop(TOAST_KEY, None)
    if pending is not None:
        st.toast(pending[0], icon=pending[1])


def _saved_key(key: str) -> str:
    return f"{key}_saved"


def _example_key(key: str, index: int) -> str:
    """The key prefix of one example's own fields (suggested label, note): a new example starts from its own values."""
    return f"{key}_{index}"


def save_verdict(run_id: str, example_id: int, index: int, kind: str, key: str, on_saved: Callable[[str], None] | None = None) -> None:
    """Save a verdict with the controls' suggested label and note as this tab's action, toast it, then on_saved(kind) (a callback)."""
    fields = _example_key(key, index)
    suggestion = st.session_state.get(f"{fields}_suggested")
    saved = call_or_report(
        annotations().set_flag, run_id, example_id, kind, actor=actor(),
        suggested_label=int(suggestion) if kind == "mislabeled" and suggestion is not None else None,
        note=st.session_state.get(f"{fields}_note", ""),
    )
    if saved is not None:
        st.session_state[_saved_key(key)] = kind
        announce(f"Training example #{index} flagged **{kind}**. {UNDO_HINT}", FLAG_ICONS[kind])
        if on_saved is not None:
            on_saved(kind)


def save_note(run_id: str, example_id: int, index: int, key: str) -> None:
    """Save the note typed for an example that has a verdict (Enter, or leaving the field); else keep it for the verdict (a callback)."""
    flag = annotations().flags(run_id).get(example_id)
    note = st.session_state.get(f"{_example_key(key, index)}_note", "")
    if flag is None:
        if note.strip():  # an emptied field keeps nothing: no toast
            announce(f"Note on #{index} kept: it is saved with the verdict you choose.", ":material/edit_note:")
        return
    if note == flag.note:
        return
    if call_or_report(annotations().set_flag, run_id, example_id, flag.kind, suggested_label=flag.suggested_label, note=note,
                      actor=actor()) is not None:
        announce(f"Note on #{index} saved. {UNDO_HINT}", ":material/edit_note:")


def flag_controls(
    run_id: str,
    train_set,
    index: int,
    *,
    key: str,
    suggested_label: int | None = None,
    shortcuts: bool = False,
    per_row: int = 4,
    on_saved: Callable[[str], None] | None = None,
) -> str | None:
    """Verdict buttons for training example `index`; returns the kind saved on this run by this press, if any.

    The mislabeled verdict stores the suggested label chosen in the selectbox (preset to
    `suggested_label`), every verdict stores the note; pressing Enter in the note saves it at once
    when the example has a verdict. Each write is one undoable action of this tab (session.actor)
    and is confirmed by a toast. With `shortcuts`, each verdict has its VERDICT_KEYS key ("M"); the buttons come
    `per_row` to a row. on_saved(kind) runs after a verdict is saved, before the next run (say, to move on).
    Keys: the buttons are `<key>_<kind>` whatever the example, the fields `<key>_<index>_suggested` and `_note`.
    """
    show_pending_toast()
    example_id = int(train_set.ids[index])
    flag = annotations().flags(run_id).get(example_id)
    # The line is drawn either way, so a verdict (this tab's or another's) moves no control below it: Streamlit would draw
    # moved controls anew beside their old, stale copies until the run ends, two of each verdict button for a while.
    if flag is None:
        st.markdown("Current verdict: :gray[none yet]")
    else:
        st.markdown(f"Current verdict: :{FLAG_COLOURS[flag.kind]}-badge[:material/flag: {flag.kind}]"
                    + (f" → {class_name(train_set, flag.suggested_label)}" if flag.suggested_label is not None else ""))
    n_classes = len(train_set.class_names)
    preset = flag.suggested_label if flag is not None and flag.suggested_label is not None else suggested_label
    fields = _example_key(key, index)
    left, right = st.columns(2)
    left.selectbox(
        "Suggested label (saved with 'mislabeled')", range(n_classes), key=f"{fields}_suggested",
        index=preset if preset is not None and 0 <= preset < n_classes else int(train_set.y[index]),
        format_func=lambda label: class_name(train_set, label),
    )
    right.text_input("Note (Enter saves it)", value=flag.note if flag is not None else "", key=f"{fields}_note", max_chars=500,
                     placeholder="why this verdict", on_change=save_note, args=(run_id, example_id, index, key))
    # The buttons keep their keys from one example to the next, so moving on after a verdict updates them in place: a new
    # key would draw new buttons, and the pressed one would take the keyboard focus with it (an Esc then closed nothing).
    pressed = False
    columns = [column for start in range(0, len(FLAG_KINDS), per_row) for column in st.columns(per_row)]
    for column, kind in zip(columns, FLAG_KINDS):
        pressed |= column.button(
            kind.capitalize(), key=f"{key}_{kind}", icon=FLAG_ICONS[kind], width="stretch",
            shortcut=VERDICT_KEYS[kind] if shortcuts else None,
            type="primary" if flag is not None and flag.kind == kind else "secondary",
            on_click=save_verdict, args=(run_id, example_id, index, kind, key, on_saved))
    saved = st.session_state.pop(_saved_key(key), None)  # set by save_verdict, which ran before this run
    return saved if pressed else None


def verdict_keys_text() -> str:
    """The verdict keys as a keys caption lists them: "**M** mislabeled · **A** ambiguous · ..."."""
    return " · ".join(f"**{letter}** {kind}" for kind, letter in VERDICT_KEYS.items())


def undo_last(run_id: str, on_undone: Callable[[], None] | None = None) -> None:
    """Undo this tab's last flag action on the run, one flag or a whole bulk flag, and say what it restored (a button callback)."""
    restored = call_or_report(annotations().undo, run_id, actor=actor())
    if restored:
        left = call_or_report(annotations().undoable_actions, run_id, actor=actor()) or 0
        # how many actions are left tells one undo's toast from the next (their texts would be the same otherwise)
        announce(f"Undone: {len(restored)} example{'s' if len(restored) != 1 else ''} restored to their earlier verdict; "
                 + (f"{left} more action{'s' if left != 1 else ''} to undo." if left else "nothing more to undo."), ":material/undo:")
        if on_undone is not None:
            on_undone()


def undo_button(run_id: str, *, key: str, disabled: bool = False, on_undone: Callable[[], None] | None = None) -> None:
    """The undo button (shortcut UNDO_KEY): takes back this tab's last flag action on the run ("Undo (3 examples)").

    disabled: for a page whose dialog is open (the dialog draws its own, and one key must not do two things).
    on_undone() runs after an undo restored something, before the next run.
    """
    pending = annotations().can_undo(run_id, actor=actor())
    label = f"Undo ({pending} example{'s' if pending != 1 else ''})" if pending else "Undo"
    st.button(label, key=key, icon=":material/undo:", shortcut=UNDO_KEY, disabled=disabled or not pending,
              on_click=undo_last, args=(run_id, on_undone), help="Take back this tab's last flag action on this run")
