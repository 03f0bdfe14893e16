"""Mislabels: review the training examples a ranking suspects, flag them (with keyboard shortcuts), export the flags."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st

from app.components import charts
from app.components.context import publish_to_url, seed_from_url
from app.components.core_calls import annotations, call_or_report, require_run
from app.components.evaluation_calls import mislabel_ranking, ranking_choices
from app.components.examples import class_name, marks
from app.components.flagging import flag_controls
from app.components.images import GridItem, current_page, enlarged, image_grid
from attribution_core.evaluation.mislabel import MislabelRanking, mislabel_metrics, recall_curve
from attribution_core.run import Run

RANKING_KEY = "ranking"
SHORTCUTS = {"mislabeled": "M", "ambiguous": "A", "outlier": "O", "fine": "F"}
NEXT_KEY, PREVIOUS_KEY = "N", "P"
LIST_COLUMNS, LIST_ROWS = 4, 4


def position_key(run: Run, ranking: str) -> str:
    """Session-state key of the review position in one ranking of one run."""
    return f"review_{run.run_id}_{ranking}"


def move_to(key: str, position: int) -> None:
    """Set a review position (a button callback)."""
    st.session_state[key] = position


def suspect_item(train_set, ranking: MislabelRanking, index: int, rank: int, flags: dict) -> GridItem:
    """A grid cell for a suspect: rank, given label → suggested label, marks."""
    given = class_name(train_set, int(train_set.y[index]))
    suggested = "" if ranking.suggested_labels is None else f" → {class_name(train_set, int(ranking.suggested_labels[index]))}"
    caption = f"**{rank + 1}.** {given}{suggested}  \n#{index} {marks(train_set, index, flags.get(int(train_set.ids[index])))}"
    return GridItem(index, train_set.images[index], caption)


def render_review(run: Run, ranking: MislabelRanking, order: np.ndarray, key: str) -> None:
    """The suspect at the current position, large, with verdict buttons; a verdict moves to the next suspect."""
    train_set, _ = run.datasets()
    position = min(st.session_state.get(key, 0), len(order) - 1)
    index = int(order[position])
    suggested = None if ranking.suggested_labels is None else int(ranking.suggested_labels[index])
    heading, previous, following = st.columns([2, 1, 1], vertical_alignment="center")
    heading.markdown(f"#### Suspect {position + 1} of {len(order)}")
    previous.button("Previous", key="review_previous", icon=":material/arrow_back:", shortcut=PREVIOUS_KEY, width="stretch",
                    disabled=position == 0, on_click=move_to, args=(key, position - 1))
    following.button("Next", key="review_next", icon=":material/arrow_forward:", shortcut=NEXT_KEY, width="stretch",
                     disabled=position == len(order) - 1, on_click=move_to, args=(key, position + 1))
    image_column, text_column = st.columns([1, 1.3], gap="medium")
    image_column.image(enlarged(train_set.images[index], 220), caption=f"training example #{index}")
    with text_column:
        st.markdown(f"**Given label** {class_name(train_set, int(train_set.y[index]))}")
        if suggested is not None:
            st.markdown(f"**Suggested label** {class_name(train_set, suggested)}")
        st.markdown(f"**Suspicion score** {ranking.scores[index]:.4g}")
        st.markdown(marks(train_set, index, annotations().flags(run.run_id).get(int(train_set.ids[index]))))
    verdict = flag_controls(run.run_id, train_set, index, key=f"review_{index}", suggested_label=suggested,
                            shortcuts=SHORTCUTS, per_row=2)
    if verdict is not None:
        move_to(key, min(position + 1, len(order) - 1))
        st.rerun()
    st.caption("Keys: " + " · ".join(f"**{letter}** {kind}" for kind, letter in SHORTCUTS.items())
               + f" · **{NEXT_KEY}** next · **{PREVIOUS_KEY}** previous")


def render_ranked_list(run: Run, ranking: MislabelRanking, order: np.ndarray, key: str) -> None:
    """The ranked suspects as a paged grid; a suspect's button opens it for review."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    shown = current_page(len(order), LIST_COLUMNS * LIST_ROWS, key=f"suspects_page_{ranking.name}", max_visible_pages=5)
    items = [suspect_item(train_set, ranking, int(order[rank]), rank, flags) for rank in shown]
    position = st.session_state.get(key, 0)
    ranks = {int(order[rank]): rank for rank in shown}
    image_grid(items, columns=LIST_COLUMNS, key="suspect", button_label="Review", image_size=80,
               selected=int(order[min(position, len(order) - 1)]), on_click=lambda index: move_to(key, ranks[index]))


def render_export(run: Run) -> None:
    """The flag counter, the CSV download, and the flags as a table (what the CSV holds)."""
    train_set, _ = run.datasets()
    flagged, reviewed = annotations().counts(run.run_id)
    csv_text = annotations().export_csv(run.run_id, train_set.class_names)
    left, right = st.columns([2, 1], vertical_alignment="center")
    left.markdown(f"### {flagged} flagged of {reviewed} reviewed")
    right.download_button("Export flags as CSV", csv_text, file_name=f"{run.run_id}-flags.csv", mime="text/csv",
                          icon=":material/download:", key="export_csv", disabled=reviewed == 0, on_click="ignore")
    if reviewed:
        with st.expander(f"The {reviewed} verdicts of this run (the CSV's rows)"):
            st.dataframe(pd.read_csv(io.StringIO(csv_text), keep_default_na=False), hide_index=True)


def render_recall(run: Run, current: str, choices: dict[str, str]) -> None:
    """Where labels were flipped on purpose: how fast each ranking finds them."""
    train_set, _ = run.datasets()
    flipped = np.asarray(train_set.flipped)
    if not flipped.any():
        return
    st.subheader("How well the rankings find the flipped labels")
    st.caption(f"This run's data has {int(flipped.sum())} labels flipped on purpose ({flipped.mean():.0%}).")
    chosen = st.multiselect("Rankings", list(choices), default=[current], key="recall_rankings")
    curves, rows = {}, []
    for name in chosen:
        ranking = call_or_report(mislabel_ranking, run, name)
        if ranking is None:
            continue
        curves[name] = recall_curve(ranking.order(), flipped)
        metrics = mislabel_metrics(ranking.scores, flipped)
        rows.append({"ranking": name, "found in top 10 %": metrics["top10"], "found in top 20 %": metrics["top20"],
                     "ROC-AUC": metrics["auc"], "seconds": ranking.seconds})
    if curves:
        left, right = st.columns([1.6, 1], gap="large")
        left.plotly_chart(charts.recall_curves(curves), key="recall_chart")
        right.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
            "found in top 10 %": st.column_config.NumberColumn(format="percent"),
            "found in top 20 %": st.column_config.NumberColumn(format="percent"),
            "ROC-AUC": st.column_config.NumberColumn(format="%.3f"), "seconds": st.column_config.NumberColumn(format="%.1f")})


def render() -> None:
    """The Mislabels page."""
    run = require_run()
    st.title("Mislabels")
    choices = ranking_choices(run)
    top = st.columns([1, 2], vertical_alignment="bottom")
    seed_from_url(RANKING_KEY, default="loss", parse=str, valid=choices.__contains__)
    name = top[0].selectbox("Ranking", list(choices), key=RANKING_KEY, persist_state="session")
    publish_to_url(RANKING_KEY, name)
    top[1].caption(choices[name])
    render_export(run)
    ranking = call_or_report(mislabel_ranking, run, name)
    if ranking is not None:
        order = ranking.order()
        key = position_key(run, name)
        review_column, list_column = st.columns([1.15, 1], gap="large")
        with review_column:
            render_review(run, ranking, order, key)
        with list_column:
            render_ranked_list(run, ranking, order, key)
    render_recall(run, name, choices)


render()
