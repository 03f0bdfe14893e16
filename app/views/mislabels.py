"""Mislabels: review the training examples a ranking suspects (all, or those chosen on the data map), flag them with keyboard shortcuts, export the flags."""
from __future__ import annotations

import io
from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from app.components import charts
from app.components.context import publish_to_url, seed_from_url
from app.components.core_calls import annotations, call_or_report, remembered, require_run, run_key
from app.components.evaluation_calls import mislabel_ranking, ranking_choices
from app.components.examples import FLAG_COLOURS, class_name, marks
from app.components.flagging import flag_controls
from app.components.images import GridItem, current_page, enlarged, image_grid
from attribution_core.annotations import FLAG_KINDS
from attribution_core.evaluation import dynamics
from attribution_core.evaluation.mislabel import MislabelRanking, default_ranking, mislabel_metrics, recall_curve
from attribution_core.run import Run

RANKING_KEY = "ranking"
SHORTCUTS = {"mislabeled": "M", "ambiguous": "A", "outlier": "O", "fine": "F"}
NEXT_KEY, PREVIOUS_KEY = "N", "P"
LIST_COLUMNS, LIST_ROWS = 4, 4
UNREVIEWED = "not yet reviewed"
SHOW_KEY, CURVE_KEY, MAP_KEY = "mislabels_show", "mislabels_curve", "mislabels_map"
SUSPECTED_SHARE = 0.1
"""A signal suspects an example that it ranks in its top SUSPECTED_SHARE of the training set."""


def position_key(run: Run, ranking: str) -> str:
    """Session-state key of the review position in one ranking of one run."""
    return f"review_{run.run_id}_{ranking}"


def selection_key(run: Run) -> str:
    """Session-state key of the training indices chosen on the run's data map (absent: the whole ranking is reviewed)."""
    return f"mislabels_selection_{run.run_id}"


def list_page_key(ranking: str) -> str:
    """Session-state key of the ranked list's page."""
    return f"suspects_page_{ranking}"


def move_to(key: str, position: int) -> None:
    """Set a review position (a button callback)."""
    st.session_state[key] = position


def restart(key: str, ranking: str) -> None:
    """Back to the first suspect and the list's first page, once the queue changed (a callback)."""
    move_to(key, 0)
    st.session_state.pop(list_page_key(ranking), None)


def take_selection(run: Run, key: str, ranking: str) -> None:
    """The data map's box or lasso callback: its training examples become the review queue."""
    event = st.session_state.get(MAP_KEY)
    points = event.selection.points if event is not None else []
    chosen = sorted({int(point["customdata"][1]) for point in points if point.get("customdata", [None])[0] == "train"})
    if chosen:
        st.session_state[selection_key(run)] = chosen
    else:  # an empty selection (a double click) clears it
        st.session_state.pop(selection_key(run), None)
    restart(key, ranking)


def clear_selection(run: Run, key: str, ranking: str) -> None:
    """Review the whole ranking again (a button callback)."""
    st.session_state.pop(selection_key(run), None)
    restart(key, ranking)


def verdicts(run: Run) -> np.ndarray:
    """(N,) each training example's verdict kind on this run, UNREVIEWED where it has none."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    return np.array([flags[int(i)].kind if int(i) in flags else UNREVIEWED for i in train_set.ids], dtype=object)


def review_queue(run: Run, ranking: MislabelRanking, shown: list[str]) -> np.ndarray:
    """The ranking's order (training indices, most suspicious first) within the data map's selection and the verdicts shown (all when none)."""
    order = ranking.order()
    selection = st.session_state.get(selection_key(run))
    if selection is not None:
        order = order[np.isin(order, selection)]
    if shown:
        order = order[np.isin(verdicts(run)[order], shown)]
    return order


def signal_shares(run: Run) -> dict[str, np.ndarray]:
    """Each dynamics signal's top share (N,) per training example (dynamics.top_shares: 0.01 = its top 1 %)."""

    def compute() -> dict[str, np.ndarray]:
        n = len(run.datasets()[0])
        return {name: dynamics.top_shares(dynamics.signal_scores(run.record, n, name)) for name in dynamics.SIGNALS}

    return remembered(("dynamics_shares", *run_key(run)), compute)


def why_suspected(run: Run, index: int) -> str:
    """One line: the dynamics signals that rank the example in their top SUSPECTED_SHARE, most sure first."""
    shares = {name: float(values[index]) for name, values in signal_shares(run).items()}
    high = sorted((share, name) for name, share in shares.items() if share <= SUSPECTED_SHARE)
    if not high:
        return f"**Why suspected** no training-dynamics signal ranks it in its top {SUSPECTED_SHARE:.0%}."
    return "**Why suspected** " + ", ".join(f"{name} (top {max(share, 0.001):.1%})" for share, name in high)


def render_curve(run: Run, index: int) -> None:
    """The example's recorded loss or margin per epoch, its early-training window shaded."""
    choice = st.segmented_control("Training curve", ("loss", "margin"), default="loss", key=CURVE_KEY, required=True)
    epochs, values = dynamics.training_curve(run.record, index, "losses" if choice == "loss" else "margins")
    if not len(epochs):
        st.caption("The record holds no loss for this example: no batch drew it.")
        return
    first, stop = dynamics.early_window(np.array([len(epochs)]))
    st.plotly_chart(charts.training_curve(epochs, values, label=choice, early=(int(epochs[first[0]]), int(epochs[stop[0] - 1]))),
                    key="mislabels_curve_chart")


def suspect_item(train_set, ranking: MislabelRanking, index: int, rank: int, flags: dict) -> GridItem:
    """A grid cell for a suspect: rank, given label → suggested label, marks."""
    given = class_name(train_set, int(train_set.y[index]))
    suggested = "" if ranking.suggested_labels is None else f" → {class_name(train_set, int(ranking.suggested_labels[index]))}"
    caption = f"**{rank + 1}.** {given}{suggested}  \n#{index} {marks(train_set, index, flags.get(int(train_set.ids[index])))}"
    return GridItem(index, train_set.images[index], caption)


def render_review(run: Run, ranking: MislabelRanking, queue: np.ndarray, key: str, shown: list[str]) -> None:
    """The suspect at the current position, large, with verdict buttons; a verdict moves to the next suspect."""
    train_set, _ = run.datasets()
    position = min(st.session_state.get(key, 0), len(queue) - 1)
    index = int(queue[position])
    suggested = None if ranking.suggested_labels is None else int(ranking.suggested_labels[index])
    heading, previous, following = st.columns([2, 1, 1], vertical_alignment="center")
    heading.markdown(f"#### Suspect {position + 1} of {len(queue)}")
    previous.button("Previous", key="review_previous", icon=":material/arrow_back:", shortcut=PREVIOUS_KEY, width="stretch",
                    disabled=position == 0, on_click=move_to, args=(key, position - 1))
    following.button("Next", key="review_next", icon=":material/arrow_forward:", shortcut=NEXT_KEY, width="stretch",
                     disabled=position == len(queue) - 1, on_click=move_to, args=(key, position + 1))
    image_column, text_column = st.columns([1, 1.3], gap="medium")
    image_column.image(enlarged(train_set.images[index], 220), caption=f"training example #{index}")
    with text_column:
        st.markdown(f"**Given label** {class_name(train_set, int(train_set.y[index]))}")
        if suggested is not None:
            st.markdown(f"**Suggested label** {class_name(train_set, suggested)}")
        st.markdown(f"**Suspicion score** {ranking.scores[index]:.4g}")
        if dynamics.has_dynamics(run.record):
            st.markdown(why_suspected(run, index))
        st.markdown(marks(train_set, index, annotations().flags(run.run_id).get(int(train_set.ids[index]))))
    if dynamics.has_dynamics(run.record):
        render_curve(run, index)
    verdict = flag_controls(run.run_id, train_set, index, key=f"review_{index}", suggested_label=suggested,
                            shortcuts=SHORTCUTS, per_row=2)
    if verdict is not None:
        # an example the verdict filters out leaves the queue: the next suspect moves into its place
        move_to(key, position if shown and verdict not in shown else min(position + 1, len(queue) - 1))
        st.rerun()
    st.caption("Keys: " + " · ".join(f"**{letter}** {kind}" for kind, letter in SHORTCUTS.items())
               + f" · **{NEXT_KEY}** next · **{PREVIOUS_KEY}** previous")


def render_ranked_list(run: Run, ranking: MislabelRanking, queue: np.ndarray, key: str) -> None:
    """The queue's suspects as a paged grid; a suspect's button opens it for review."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    shown = current_page(len(queue), LIST_COLUMNS * LIST_ROWS, key=list_page_key(ranking.name), max_visible_pages=5)
    items = [suspect_item(train_set, ranking, int(queue[rank]), rank, flags) for rank in shown]
    position = st.session_state.get(key, 0)
    ranks = {int(queue[rank]): rank for rank in shown}
    image_grid(items, columns=LIST_COLUMNS, key="suspect", button_label="Review", image_size=80,
               selected=int(queue[min(position, len(queue) - 1)]), on_click=lambda index: move_to(key, ranks[index]))


def map_groups(run: Run, positions: np.ndarray, current: int | None) -> list[charts.PointGroup]:
    """The data map's traces: examples by verdict (grey without), labels flipped on purpose as crosses, the current suspect as a star."""
    train_set, _ = run.datasets()
    drawn = np.isfinite(positions).all(axis=1)  # an example no batch drew has no place on the map
    kinds = verdicts(run)

    def group(name: str, mask: np.ndarray, **style) -> charts.PointGroup:
        indices = np.flatnonzero(mask & drawn)
        hover = [f"train #{i} · {class_name(train_set, int(train_set.y[i]))} · confidence {positions[i, 1]:.2f}, "
                 f"variability {positions[i, 0]:.2f}" for i in indices]
        return charts.PointGroup(name, "train", indices, positions[indices], hover, **style)

    groups = [group("no verdict", kinds == UNREVIEWED, colour="#D0D5DB", size=5)]
    flipped = np.asarray(train_set.flipped)
    if flipped.any():
        groups.append(group("label flipped on purpose", flipped, colour="#F58518", symbol="x", size=7))
    groups += [group(kind, kinds == kind, colour=colour, size=8) for kind, colour in FLAG_COLOURS.items() if (kinds == kind).any()]
    if current is not None:
        groups.append(group("current suspect", np.arange(len(train_set)) == current, colour="#111111", symbol="star", size=16))
    return groups


def render_data_map(run: Run, key: str, ranking: str, current: int | None) -> None:
    """Confidence against variability of every training example; a box or lasso sends its examples to the review queue."""
    n = len(run.datasets()[0])
    confidence, variability = remembered(("data_map", *run_key(run)), lambda: dynamics.data_map(run.record, n))
    map_column, side_column = st.columns([2.2, 1], gap="large")
    with map_column:
        st.plotly_chart(charts.data_map(map_groups(run, np.stack([variability, confidence], axis=1), current)), key=MAP_KEY,
                        on_select=partial(take_selection, run, key, ranking), selection_mode=("box", "lasso"))
    with side_column:
        st.caption("Each training example's probability of its label at the steps that drew it: mean (confidence) and spread "
                   "over the epochs (variability). Mislabels sit low and to the left, hard to learn; high variability is "
                   "ambiguous (Swayamdipta et al. 2020).")
        selection = st.session_state.get(selection_key(run))
        if selection is None:
            st.caption("Draw a box or lasso on the map to review the examples inside it.")
        else:
            st.markdown(f"**Reviewing the {len(selection)} examples selected on the map**, in ranking order.")
            st.button("Review the whole ranking", key="mislabels_clear_selection", icon=":material/close:",
                      on_click=clear_selection, args=(run, key, ranking))


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
    default, fallback_reason = default_ranking(run)
    top = st.columns([1, 2], vertical_alignment="bottom")
    seed_from_url(RANKING_KEY, default=default, parse=str, valid=choices.__contains__)
    name = top[0].selectbox("Ranking", list(choices), key=RANKING_KEY, persist_state="session")
    publish_to_url(RANKING_KEY, name)
    top[1].caption(choices[name])
    if fallback_reason is not None:
        st.info(f"No training dynamics: {fallback_reason} The data map and the training curves need a record too.",
                icon=":material/history_toggle_off:")
    render_export(run)
    ranking = call_or_report(mislabel_ranking, run, name)
    if ranking is None:
        render_recall(run, name, choices)
        return
    key = position_key(run, name)
    shown = st.pills("Show", (UNREVIEWED, *FLAG_KINDS), selection_mode="multi", default=[], key=SHOW_KEY,
                     on_change=restart, args=(key, name), help="Only the suspects not yet reviewed, or with these verdicts (none chosen: all)")
    queue = review_queue(run, ranking, list(shown))
    current = int(queue[min(st.session_state.get(key, 0), len(queue) - 1)]) if len(queue) else None
    if fallback_reason is None:
        render_data_map(run, key, name, current)
    if not len(queue):
        st.info("No suspect matches: choose other verdicts to show, or another part of the map.", icon=":material/filter_alt_off:")
    else:
        review_column, list_column = st.columns([1.15, 1], gap="large")
        with review_column:
            render_review(run, ranking, queue, key, list(shown))
        with list_column:
            render_ranked_list(run, ranking, queue, key)
    render_recall(run, name, choices)


render()
