"""Mislabels: review the training examples a ranking suspects (all, a filtered part, or those chosen on the data map).

Flag them one by one with keyboard shortcuts, or many at once (ticked thumbnails, the map's
selection, the top k of the queue), undo this tab's last action, and export the flags as CSV, as
cleanlab's label-issues mask, or as a FiftyOne dataset. Then clean: the plan the flags make, its
predicted effect, a retrain with it beside a control, and the cleaned data (components/cleaning.py).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from app.components import charts
from app.components.bulk import bulk_flag_button, kind_choice
from app.components.cleaning import render_cleaning
from app.components.context import url_selectbox
from app.components.core_calls import annotations, call_or_report, remembered, require_run, run_key
from app.components.downloads import MASK_FILE, cleanlab_zip, fiftyone_folder, fiftyone_zip, flags_table
from app.components.examples import FLAG_COLOURS, UNREVIEWED, class_name, marks, verdicts
from app.components.flagging import UNDO_KEY, flag_controls, show_pending_toast, undo_button, verdict_keys_text
from app.components.images import GridItem, current_page, example_card, image_grid
from app.components.rankings import mislabel_ranking, ranking_choices, stored_rankings
from attribution_core.annotations import FLAG_KINDS
from attribution_core.evaluation import dynamics
from attribution_core.evaluation.mislabel import (
    MislabelRanking,
    default_ranking,
    mislabel_metrics,
    ranking_label,
    recall_curve,
)
from attribution_core.runs.run import Run

RANKING_KEY = "ranking"
NEXT_KEY, PREVIOUS_KEY = "N", "P"
LIST_COLUMNS, LIST_ROWS = 3, 4
"""The suspects' grid beside the review card: three cells a row keep a whole "mislabeled" badge in a cell at 1280 px."""
SHOW_KEY, CLASSES_KEY, SHARE_KEY, ORDER_KEY = "mislabels_show", "mislabels_classes", "mislabels_share", "mislabels_order"
CURVE_KEY, MAP_KEY, KIND_KEY, TOP_K_KEY = "mislabels_curve", "mislabels_map", "mislabels_bulk_kind", "mislabels_top_k"
REDRAW_KEY = "mislabels_redraw"
"""Session state, set by a callback of the review area: the next run must redraw the whole page (the bulk section reads the ticks)."""
BEHIND_KEY, MOVED_KEY = "mislabels_behind", "mislabels_moved"
"""Session state: verdicts and undos given in the review area since the page was last drawn whole (the map's colours and the
cleaning plan lag by these), and whether the review moved to another suspect since (the map's star lags)."""
SUSPECTED_SHARE = 0.1
"""A signal suspects an example that it ranks in its top SUSPECTED_SHARE of the training set."""
SHARES = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The suspicion filter's choices: the ranking's most suspicious share of the training set (1.0: all)."""
ORDERS = ("most suspicious first", "least suspicious first", "given class", "verdict")
"""How the queue can be sorted; ties keep the ranking's order (most suspicious first)."""
TOP_K = 20
"""The top-k bulk flag's preset."""
RECALL_COMPANIONS = ("aum", "confidence", "loss_avg", "margin_avg")
"""Shown beside the current ranking when the recall comparison opens (with every ranking already stored): the published
detectors read from the training record (AUM, Pleiss et al. 2020; data-map confidence, Swayamdipta et al. 2020) and the
two checkpoint baselines. None of them retrains; cleanlab's cross-validation and self-influence fits are one click away."""


@dataclass(frozen=True)
class QueueView:
    """Which suspects the queue holds and in which order: verdicts and given classes shown (empty: all), share, order."""

    verdicts: tuple[str, ...] = ()
    classes: tuple[int, ...] = ()
    share: float = 1.0
    order: str = ORDERS[0]


def position_key(run: Run, ranking: str) -> str:
    """Session-state key of the review position in one ranking of one run."""
    return f"review_{run.run_id}_{ranking}"


def selection_key(run: Run) -> str:
    """Session-state key of the training indices chosen on the run's data map (absent: the whole ranking is reviewed)."""
    return f"mislabels_selection_{run.run_id}"


def ticked_key(run: Run) -> str:
    """Session-state key of the training indices ticked in the grid (kept across the grid's pages and filters)."""
    return f"mislabels_ticked_{run.run_id}"


def confirm_key(run: Run) -> str:
    """Session-state key of a top-k flag awaiting confirmation: (training indices, kind)."""
    return f"mislabels_confirm_{run.run_id}"


def list_page_key(ranking: str) -> str:
    """Session-state key of the ranked list's page."""
    return f"suspects_page_{ranking}"


def move_to(key: str, position: int) -> None:
    """Set a review position (a button callback)."""
    st.session_state[key] = position
    st.session_state[MOVED_KEY] = True


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


def ticked(run: Run) -> list[int]:
    """The training indices ticked in the grid, in the order they were ticked."""
    return list(st.session_state.get(ticked_key(run), []))


def tick(run: Run, index: int, on: bool) -> None:
    """Tick or untick one training example (a checkbox callback)."""
    chosen = [other for other in ticked(run) if other != index]
    st.session_state[ticked_key(run)] = [*chosen, index] if on else chosen
    st.session_state[REDRAW_KEY] = True


def tick_all(run: Run, indices: list[int]) -> None:
    """Tick every example of a grid page (a button callback)."""
    st.session_state[ticked_key(run)] = list(dict.fromkeys([*ticked(run), *indices]))
    st.session_state[REDRAW_KEY] = True


def untick_all(run: Run) -> None:
    """Untick everything (a button callback, and what follows a bulk flag of the ticked examples)."""
    st.session_state.pop(ticked_key(run), None)


def review_queue(run: Run, ranking: MislabelRanking, view: QueueView) -> np.ndarray:
    """The queue: training indices of the ranking's top `view.share`, within the map's selection, verdicts and classes shown, sorted."""
    order = ranking.order()
    order = order[: max(1, round(view.share * len(order)))]
    selection = st.session_state.get(selection_key(run))
    if selection is not None:
        order = order[np.isin(order, selection)]
    kinds = verdicts(run.datasets()[0], annotations().flags(run.run_id))[order]
    labels = run.datasets()[0].y.numpy()[order]
    keep = np.ones(len(order), dtype=bool)
    if view.verdicts:
        keep &= np.isin(kinds, view.verdicts)
    if view.classes:
        keep &= np.isin(labels, view.classes)
    order, kinds, labels = order[keep], kinds[keep], labels[keep]
    if view.order == "least suspicious first":
        return order[::-1]
    if view.order == "given class":
        return order[np.argsort(labels, kind="stable")]
    if view.order == "verdict":  # flags first, in FLAG_KINDS order, then the examples not yet reviewed
        place = {kind: number for number, kind in enumerate((*FLAG_KINDS, UNREVIEWED))}
        return order[np.argsort([place[kind] for kind in kinds], kind="stable")]
    return order


def share_label(ranking: MislabelRanking, share: float) -> str:
    """'top 10 % (score ≥ 0.731)' or 'all': a suspicion filter choice, with the score it starts at."""
    if share >= 1:
        return "all"
    last = ranking.order()[max(1, round(share * len(ranking.scores))) - 1]
    return f"top {share:.0%} (score ≥ {ranking.scores[last]:.3g})"


def render_filters(run: Run, ranking: MislabelRanking, key: str) -> QueueView:
    """The queue's filters and order: verdict (and not yet reviewed), given class, suspicion score; any change restarts the review."""
    train_set, _ = run.datasets()
    restart_review = dict(on_change=restart, args=(key, ranking.name))
    first, second = st.columns([2.4, 1.2], vertical_alignment="bottom"), st.columns([1.2, 1.2, 1.2], vertical_alignment="bottom")
    shown = first[0].pills("Show", (UNREVIEWED, *FLAG_KINDS), selection_mode="multi", default=[], key=SHOW_KEY,
                           help="Only the suspects not yet reviewed, or with these verdicts (none chosen: all)", **restart_review)
    order = first[1].selectbox("Order", ORDERS, key=ORDER_KEY, **restart_review)
    classes = second[0].multiselect("Given class", range(len(train_set.class_names)), key=CLASSES_KEY, placeholder="any",
                                    format_func=lambda label: class_name(train_set, label), **restart_review)
    share = second[1].select_slider("Suspicion score", SHARES, value=1.0, key=SHARE_KEY, format_func=partial(share_label, ranking),
                                    help="Only the ranking's most suspicious share of the training set", **restart_review)
    return QueueView(tuple(shown), tuple(classes), share, order)


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
    return "**Why suspected** " + "; ".join(f"{ranking_label(name)}, top {max(share, 0.001):.1%}" for share, name in high)


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
    st.caption("Shaded: early training, the example's first draws, where the record's rankings look for labels the model "
               "could not fit before it memorised them.")


def suspect_item(train_set, ranking: MislabelRanking, index: int, rank: int, flags: dict) -> GridItem:
    """A grid cell for a suspect: rank, given label → suggested label, marks."""
    given = class_name(train_set, int(train_set.y[index]))
    suggestion = ranking.suggestion(index, int(train_set.y[index]))
    suggested = "" if suggestion is None else f" → {class_name(train_set, suggestion)}"
    caption = f"**{rank + 1}.** {given}{suggested}  \n#{index} {marks(train_set, index, flags.get(int(train_set.ids[index])))}"
    return GridItem(index, train_set.images[index], caption)


def fell_behind() -> None:
    """Count a verdict or undo given in the review area, which the map and the cleaning plan do not show yet (a callback)."""
    st.session_state[BEHIND_KEY] = st.session_state.get(BEHIND_KEY, 0) + 1


def advance(key: str, position: int, length: int, shown: tuple[str, ...], kind: str) -> None:
    """After a verdict: the next suspect (a callback).

    An example the verdict filters out leaves the queue: the next one moves into its place.
    """
    fell_behind()
    move_to(key, position if shown and kind not in shown else min(position + 1, length - 1))


def render_review(run: Run, ranking: MislabelRanking, queue: np.ndarray, key: str, shown: tuple[str, ...]) -> None:
    """The suspect at the current position, large, with verdict buttons; a verdict moves to the next suspect."""
    train_set, _ = run.datasets()
    position = min(st.session_state.get(key, 0), len(queue) - 1)
    index = int(queue[position])
    suggested = ranking.suggestion(index, int(train_set.y[index]))
    st.markdown(f"#### Suspect {position + 1} of {len(queue)}")
    previous, following = st.columns(2)
    previous.button("Previous", key="review_previous", icon=":material/arrow_back:", shortcut=PREVIOUS_KEY, width="stretch",
                    disabled=position == 0, on_click=move_to, args=(key, position - 1))
    following.button("Next", key="review_next", icon=":material/arrow_forward:", shortcut=NEXT_KEY, width="stretch",
                     disabled=position == len(queue) - 1, on_click=move_to, args=(key, position + 1))
    with example_card(train_set.images[index], size=220, alt=f"#{index}", caption=f"training example #{index}", widths=(1, 1.3),
                      gap="medium"):
        st.markdown(f"**Given label** {class_name(train_set, int(train_set.y[index]))}")
        if suggested is not None:
            st.markdown(f"**Suggested label** {class_name(train_set, suggested)}")
        st.markdown(f"**Suspicion score** {ranking.scores[index]:.4g}")
        if dynamics.has_dynamics(run.record):
            st.markdown(why_suspected(run, index))
        st.markdown(marks(train_set, index, annotations().flags(run.run_id).get(int(train_set.ids[index]))))
    if dynamics.has_dynamics(run.record):
        render_curve(run, index)
    flag_controls(run.run_id, train_set, index, key="review", suggested_label=suggested, shortcuts=True, per_row=2,
                  on_saved=partial(advance, key, position, len(queue), shown))
    undo_button(run.run_id, key="mislabels_undo", on_undone=fell_behind)  # a row of its own: "Undo (152 examples)" whole
    st.caption("Keys: " + verdict_keys_text() + f" · **{NEXT_KEY}** next · **{PREVIOUS_KEY}** previous · **{UNDO_KEY}** undo")


def render_ranked_list(run: Run, ranking: MislabelRanking, queue: np.ndarray, key: str) -> None:
    """The queue's suspects as a paged grid with a tick box each; a suspect's button opens it for review."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    shown = current_page(len(queue), LIST_COLUMNS * LIST_ROWS, key=list_page_key(ranking.name), max_visible_pages=5)
    items = [suspect_item(train_set, ranking, int(queue[rank]), rank, flags) for rank in shown]
    position = st.session_state.get(key, 0)
    ranks = {int(queue[rank]): rank for rank in shown}
    st.button(f"Tick the {len(items)} on this page", key="mislabels_tick_page", icon=":material/select_all:",
              on_click=tick_all, args=(run, [item.index for item in items]))
    image_grid(items, columns=LIST_COLUMNS, key="suspect", button_label="Review", image_size=80,
               selected=int(queue[min(position, len(queue) - 1)]), on_click=lambda index: move_to(key, ranks[index]),
               checked=set(ticked(run)), on_check=partial(tick, run))


def ask_top_k(run: Run, ranking: MislabelRanking, view: QueueView, k: int, kind: str) -> None:
    """Ask to confirm a top-k flag of the queue as it is at the click.

    A button callback: keys may have changed the queue since the page was drawn.
    """
    st.session_state[confirm_key(run)] = ([int(index) for index in review_queue(run, ranking, view)[:k]], kind)


def cancel_top_k(run: Run) -> None:
    """Forget a top-k flag awaiting confirmation (a callback)."""
    st.session_state.pop(confirm_key(run), None)


def render_top_k_confirmation(run: Run, ranking: MislabelRanking) -> None:
    """The top-k flag awaiting confirmation: how many, with what verdict, how many verdicts it replaces; confirm or cancel."""
    indices, kind = st.session_state[confirm_key(run)]
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    replaced = sum(int(train_set.ids[index]) in flags for index in indices)
    with st.container(border=True, key="mislabels_confirm"):
        st.warning(f"Flag the first **{len(indices)}** suspects of this queue, ranked by {ranking_label(ranking.name)}, as **{kind}**? "
                   + (f"{replaced} of them already have a verdict, which this replaces. " if replaced else "")
                   + f"It is one action: **{UNDO_KEY}** (undo) takes all of them back.", icon=":material/warning:")
        left, right, _ = st.columns([1.3, 1, 2])
        with left:
            bulk_flag_button(run.run_id, train_set, indices, kind, key="mislabels_confirm_top", noun="suspects",
                             after=partial(cancel_top_k, run), ranking=ranking)
        right.button("Cancel", key="mislabels_cancel_top", icon=":material/close:", on_click=cancel_top_k, args=(run,))


def render_bulk(run: Run, ranking: MislabelRanking, queue: np.ndarray, view: QueueView) -> None:
    """Many verdicts at once: on the ticked thumbnails, the map's selection or the queue's first k (undo: beside the review card)."""
    train_set, _ = run.datasets()
    chosen, selection = ticked(run), st.session_state.get(selection_key(run))
    with st.container(border=True, key="mislabels_bulk"):
        kind = kind_choice(key=KIND_KEY, label="Flag many at once as")
        actions = st.columns([1.2, 1.2, 0.7, 1.2], vertical_alignment="bottom")
        with actions[0]:
            bulk_flag_button(run.run_id, train_set, chosen, kind, key="mislabels_flag_ticked", noun="ticked",
                             after=partial(untick_all, run), ranking=ranking)
        with actions[1]:
            if selection is not None:
                bulk_flag_button(run.run_id, train_set, selection, kind, key="mislabels_flag_map", noun="on the map",
                                 ranking=ranking)
            else:
                st.button("Untick all", key="mislabels_untick", icon=":material/deselect:", disabled=not chosen,
                          on_click=untick_all, args=(run,))
        k = actions[2].number_input("Top k", min_value=1, max_value=max(1, len(queue)), value=min(TOP_K, max(1, len(queue))),
                                    key=TOP_K_KEY, help="How many of the queue's first suspects (as listed) to flag")
        actions[3].button(f"Flag the first {k}…", key="mislabels_ask_top", icon=":material/playlist_add_check:",
                          disabled=not len(queue), on_click=ask_top_k, args=(run, ranking, view, k, kind),
                          help=f"Flag the first {k} suspects of the queue as {kind}, after a confirmation")
    # Drawn into a placeholder that is there either way: an element that comes and goes above the review area would move it
    # and change its fragment's id, and a key pressed while a whole run draws the other id would be dropped unseen.
    confirmation = st.empty()
    if confirm_key(run) in st.session_state:
        with confirmation.container():
            render_top_k_confirmation(run, ranking)


def map_groups(run: Run, positions: np.ndarray, current: int | None) -> list[charts.PointGroup]:
    """The data map's traces: examples by verdict (grey without), labels flipped on purpose as crosses, the current suspect as a star."""
    train_set, _ = run.datasets()
    drawn = np.isfinite(positions).all(axis=1)  # an example no batch drew has no place on the map
    kinds = verdicts(run.datasets()[0], annotations().flags(run.run_id))

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
            st.markdown(f"**Reviewing the {len(selection)} examples selected on the map**, in ranking order. "
                        "Flag them all at once under the map.")
            st.button("Review the whole ranking", key="mislabels_clear_selection", icon=":material/close:",
                      on_click=clear_selection, args=(run, key, ranking))


def render_export(run: Run) -> None:
    """The flag counter, the downloads (CSV, cleanlab mask, FiftyOne dataset), and the flags as a table (what the CSV holds)."""
    train_set, _ = run.datasets()
    store = annotations()
    flagged, reviewed = store.counts(run.run_id)
    mislabeled = sum(flag.kind == "mislabeled" for flag in store.flags(run.run_id).values())
    csv_text = call_or_report(flags_table, run, store)
    if csv_text is None:
        return
    columns = st.columns([2, 0.8, 1.1, 1.3], vertical_alignment="center")
    columns[0].markdown(f"### {flagged} flagged of {reviewed} reviewed")
    columns[1].download_button("CSV", csv_text, file_name=f"{run.run_id}-flags.csv", mime="text/csv",
                               icon=":material/download:", key="export_csv", disabled=reviewed == 0, on_click="ignore", width="stretch",
                               help="One row per verdict: train_index is the example's #N on these pages, example_id its id in "
                                    "the dataset, then its given and suggested label")
    columns[2].download_button(
        "cleanlab mask", lambda: cleanlab_zip(run, store), file_name=f"{run.run_id}-label_issues.zip",
        mime="application/zip", icon=":material/download:", key="export_cleanlab", disabled=mislabeled == 0,
        on_click="ignore", width="stretch",
        help=f"{MASK_FILE}, cleanlab's label_issues layout: np.load gives a bool array of {len(train_set)}, position i the "
             f"example #i, True where flagged mislabeled ({mislabeled} now); {MASK_FILE}.json gives each position's example "
             "id, given and suggested label")
    columns[3].download_button(
        "FiftyOne dataset", lambda: fiftyone_zip(run, store), file_name=f"{fiftyone_folder(run)}.zip", mime="application/zip",
        icon=":material/download:", key="export_fiftyone", disabled=reviewed == 0, on_click="ignore", width="stretch",
        help=f"The {reviewed} reviewed examples, one tag per verdict. Unzip, then "
             f"fo.Dataset.from_dir('{fiftyone_folder(run)}', dataset_type=fo.types.FiftyOneDataset)")
    if reviewed:
        with st.expander(f"The {reviewed} verdicts of this run (the CSV's rows)"):
            st.dataframe(pd.read_csv(io.StringIO(csv_text), keep_default_na=False), hide_index=True)


def render_recall(run: Run, current: str, choices: dict[str, str]) -> None:
    """Where labels were flipped on purpose: how fast each ranking finds them, the current one beside its companions."""
    train_set, _ = run.datasets()
    flipped = np.asarray(train_set.flipped)
    if not flipped.any():
        return
    st.subheader("How well the rankings find the flipped labels")
    st.caption(f"This run's data has {int(flipped.sum())} labels flipped on purpose ({flipped.mean():.0%}).")
    opening = [current, *(name for name in (*RECALL_COMPANIONS, *stored_rankings(run, choices)) if name in choices)]
    chosen = st.multiselect("Rankings", list(choices), default=list(dict.fromkeys(opening)), key=f"recall_rankings_{run.run_id}",
                            format_func=ranking_label)
    curves, rows = {}, []
    for name in chosen:
        ranking = call_or_report(mislabel_ranking, run, name)
        if ranking is None:
            continue
        curves[ranking_label(name)] = recall_curve(ranking.order(), flipped)
        metrics = mislabel_metrics(ranking.scores, flipped)
        rows.append({"ranking": ranking_label(name), "found in top 10 %": metrics["top10"], "found in top 20 %": metrics["top20"],
                     "ROC-AUC": metrics["auc"], "seconds": ranking.seconds})
    if curves:
        # the table under the chart, the whole page wide: every column shows in full at 1280 px
        st.plotly_chart(charts.recall_curves(curves), key="recall_chart")
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="recall_table", column_config={
            "ranking": st.column_config.TextColumn(width="large"),
            "found in top 10 %": st.column_config.NumberColumn(format="percent"),
            "found in top 20 %": st.column_config.NumberColumn(format="percent"),
            "ROC-AUC": st.column_config.NumberColumn(format="%.3f"), "seconds": st.column_config.NumberColumn(format="%.1f")})


def changes(count: int) -> str:
    """'your last 3 flag changes' (verdicts and undos), 'your last flag change'."""
    return f"your last {count} flag changes" if count != 1 else "your last flag change"


@st.fragment
def render_review_area(run: Run, ranking: MislabelRanking, key: str, view: QueueView, notes: tuple) -> None:
    """The flag counter and exports, the review card and the suspects' grid: a fragment, so a key (a verdict, N, P, U) reruns it alone.

    The queue is made anew here from the flags as they are. What lies outside (the data map, the bulk section, the cleaning
    plan) is drawn by the page's whole runs: a tick (which the bulk section counts) asks for one; after verdicts or moves
    given here, `notes` (st.empty placeholders above the map and the plan, drawn by the whole run) say what lags, and a
    button here redraws the page.
    """
    if st.session_state.pop(REDRAW_KEY, False):
        st.rerun(scope="app")
    show_pending_toast()  # an undo's, when no review card draws it
    render_export(run)
    behind, moved = st.session_state.get(BEHIND_KEY, 0), st.session_state.get(MOVED_KEY, False)
    map_note, plan_note = notes  # written on every run, also to empty them: a fragment may fill only what the whole run wrote
    lag = changes(behind) if behind else "your last moves"
    if map_note is not None and (behind or moved):
        map_note.caption(f":material/history: The map shows the flags and the current suspect's star as they were before {lag}: "
                         "**Redraw the page** under the review card.")
    elif map_note is not None:
        map_note.empty()
    if behind:
        plan_note.caption(f":material/history: This plan was made before {lag}: **Redraw the page** under the review card to make "
                          "it from the flags as they are.")
    else:
        plan_note.empty()
    queue = review_queue(run, ranking, view)
    if not len(queue):
        st.info("No suspect matches: show other verdicts, classes or scores, or choose another part of the map.",
                icon=":material/filter_alt_off:")
        undo_button(run.run_id, key="mislabels_undo", on_undone=fell_behind)
    else:
        review_column, list_column = st.columns([1.15, 1], gap="large")
        with review_column:
            render_review(run, ranking, queue, key, view.verdicts)
        with list_column:
            render_ranked_list(run, ranking, queue, key)
    if behind or (moved and map_note is not None):  # under the card: a row above it would move its buttons while the keys run
        note, redraw = st.columns([3, 1], vertical_alignment="center")
        note.caption(("The data map above and the cleaning plan below were" if behind else "The data map above was")
                     + f" drawn before {lag}.")
        if redraw.button("Redraw the page", key="mislabels_redraw_page", icon=":material/refresh:", width="stretch"):
            st.rerun(scope="app")


def render() -> None:
    """The Mislabels page."""
    run = require_run()
    st.session_state.pop(REDRAW_KEY, None)
    st.session_state[BEHIND_KEY], st.session_state[MOVED_KEY] = 0, False  # this run draws everything anew
    st.title("Mislabels")
    choices = ranking_choices(run)
    default, fallback_reason = default_ranking(run)
    top = st.columns([1.4, 2], vertical_alignment="bottom")
    name = url_selectbox("Ranking", list(choices), key=RANKING_KEY, default=default, target=top[0], persist_state="session",
                         format_func=ranking_label)
    top[1].caption(choices[name])
    if fallback_reason is not None:
        st.info(f"No training dynamics: {fallback_reason} The data map and the training curves need a record too.",
                icon=":material/history_toggle_off:")
    ranking = call_or_report(mislabel_ranking, run, name)
    if ranking is None:
        render_export(run)
        render_recall(run, name, choices)
        return
    key = position_key(run, name)
    view = render_filters(run, ranking, key)
    queue = review_queue(run, ranking, view)
    current = int(queue[min(st.session_state.get(key, 0), len(queue) - 1)]) if len(queue) else None
    map_note = None
    if fallback_reason is None:
        map_note = st.empty()
        render_data_map(run, key, name, current)
    render_bulk(run, ranking, queue, view)
    area = st.container()
    plan_note = st.empty()  # above the cleaning section
    with area:
        render_review_area(run, ranking, key, view, (map_note, plan_note))
    render_cleaning(run, name)
    render_recall(run, name, choices)


render()
