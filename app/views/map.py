"""Map: training and test examples laid out by what the model sees (UMAP), coloured by label, flag or influence.

A box, lasso or click selects examples: they show as a grid, each can be opened (and flagged), and
the selected training examples can be flagged all at once. A split of more than MAX_DRAWN points is
drawn as a fixed sample of them; a box or lasso still selects every point inside it. ?example=<training index> marks one
training example on the map (Explore's "show on map" link).
"""
from __future__ import annotations

import hashlib
from functools import partial

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app.components.bulk import bulk_flag_button, kind_choice
from app.components.charts import QUALITATIVE, PointGroup, embedding_map
from app.components.core_calls import annotations, call_or_report, method_label, remembered, run_key
from app.components.embedding import MAX_DRAWN, chosen_examples, drawn_mask, embedding
from app.components.examples import FLAG_COLOURS, class_name, flipped_from, marks, score_legend, train_items
from app.components.flagging import flag_controls, undo_button
from app.components.images import enlarged, image_grid
from app.components.methods import checkpoint_label
from app.components.page import chosen_attribution, page_prelude
from app.components.queries import query_card, query_selectbox
from app.components.rankings import stored_default_ranking
from attribution_core.inspection import MapLayout
from attribution_core.runs.run import Run

COLOURINGS = ("label", "flag", "influence on a test sample")
MAX_SELECTION_SHOWN = 32
SELECTION_COLUMNS = 8
"""Cells of the selection grid per row: at 1280 px each is wide enough for a whole "mislabeled" badge."""
EXAMPLE_PARAM = "example"
"""URL query parameter naming a training example (its index) to mark on the map."""
CHART_KEY = "map_chart"
OPEN_KEY = "map_open"
"""Session-state key of the training example open in the dialog."""
STRONGEST_SHARE = 10
"""A sampled map coloured by influence always draws the training examples with the largest |score|, MAX_DRAWN / this many."""


def hover_texts(dataset, split: str, indices: np.ndarray) -> list[str]:
    """'train #12 · Shirt' per point."""
    return [f"{split} #{index} · {class_name(dataset, int(dataset.y[index]))}" for index in indices]


def linked_example(n_train: int) -> int | None:
    """The training index named by ?example= when it is one (0 ≤ index < n_train), else None."""
    try:
        index = int(st.query_params.get(EXAMPLE_PARAM, ""))
    except ValueError:
        return None
    return index if 0 <= index < n_train else None


SHAPES = {"train": ("training examples", "circle", 6), "test": ("test samples", "diamond", 8)}
"""Each split's legend name, marker symbol and size on the map coloured by label."""

SHAPE_KEY_COLOUR = "#8A8F98"
"""The grey of the legend's shape entries (a shape, not a class)."""


def groups_by_label(run: Run, layout: MapLayout, show_test: bool) -> list[PointGroup]:
    """One trace per class and split, test samples first so the training points are drawn over them.

    The legend has one entry per class (its colour) and one per split shown (its shape: circle, diamond).
    """
    train_set, test_set = run.datasets()
    shown = [("test", test_set, layout.test)] if show_test else []
    shown.append(("train", train_set, layout.train))
    groups = []
    for split, dataset, positions in shown:
        _, symbol, size = SHAPES[split]
        labels, drawn = dataset.y.numpy(), drawn_mask(len(dataset))
        for label in np.unique(labels):
            indices = np.flatnonzero((labels == label) & drawn)
            name = class_name(dataset, int(label))
            groups.append(PointGroup(name, split, indices, positions[indices], hover_texts(dataset, split, indices),
                                     colour=QUALITATIVE[int(label) % len(QUALITATIVE)], symbol=symbol,
                                     size=size, legend_group=name, show_legend=split == "train"))
    return groups + [shape_key(split) for split, _, _ in shown]


def shape_key(split: str) -> PointGroup:
    """A legend entry without points that shows a split's marker shape."""
    name, symbol, size = SHAPES[split]
    return PointGroup(name, split, np.array([], dtype=int), np.zeros((0, 2)), [], colour=SHAPE_KEY_COLOUR, symbol=symbol,
                      size=size + 2, legend_only=True)


def groups_by_flag(run: Run, layout: MapLayout, flags: dict) -> list[PointGroup]:
    """Training examples grouped by their verdict in flags ({example id: Flag}; grey when none), flipped labels outlined separately."""
    train_set, _ = run.datasets()
    kinds = np.array([flags[int(i)].kind if int(i) in flags else "" for i in train_set.ids])
    unflagged = np.flatnonzero((kinds == "") & drawn_mask(len(kinds)))  # every verdict is drawn, a sample of the rest
    groups = [PointGroup("no verdict", "train", unflagged, layout.train[unflagged], hover_texts(train_set, "train", unflagged),
                         colour="#D0D5DB", size=5)]
    flipped = np.asarray(train_set.flipped)
    if flipped.any():
        indices = np.flatnonzero(flipped)
        groups.append(PointGroup("label flipped on purpose", "train", indices, layout.train[indices],
                                 hover_texts(train_set, "train", indices), colour="#F58518", symbol="x", size=7))
    for kind, colour in FLAG_COLOURS.items():
        indices = np.flatnonzero(kinds == kind)
        if len(indices):
            groups.append(PointGroup(kind, "train", indices, layout.train[indices], hover_texts(train_set, "train", indices),
                                     colour=colour, size=9))
    return groups


def groups_by_influence(run: Run, layout: MapLayout, values: np.ndarray, query: int) -> list[PointGroup]:
    """Training examples coloured by their score for the query (blue proponents, red opponents), the query as a black diamond.

    A sampled map draws the strongest scores and a sample of the rest, coloured by their rank among all of the scores.
    """
    train_set, test_set = run.datasets()
    strongest = MAX_DRAWN // STRONGEST_SHARE
    keep = np.argpartition(-np.abs(values), strongest)[:strongest] if len(values) > MAX_DRAWN else None  # only a sample needs it
    indices = np.flatnonzero(drawn_mask(len(values), keep=keep))
    ranked_among = None if len(indices) == len(values) else values
    return [
        PointGroup("training examples", "train", indices, layout.train[indices], hover_texts(train_set, "train", indices),
                   values=values[indices], ranked_among=ranked_among),
        PointGroup(f"test {query}", "test", np.array([query]), layout.test[[query]], hover_texts(test_set, "test", np.array([query])),
                   colour="#111111", symbol="diamond", size=14),
    ]


def linked_group(run: Run, layout: MapLayout, index: int) -> PointGroup:
    """The training example named in the URL, as a large black star on top of the rest."""
    train_set, _ = run.datasets()
    return PointGroup(f"train #{index} (linked)", "train", np.array([index]), layout.train[[index]],
                      hover_texts(train_set, "train", np.array([index])), colour="#111111", symbol="star", size=20)


def digest(data: bytes) -> str:
    """A short fingerprint of bytes (what a figure shows, in its cache key)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def map_figure(run: Run, layout: MapLayout, checkpoint: int, colouring: str, show_test: bool, linked: int | None,
               values: np.ndarray | None, query: int | None) -> go.Figure:
    """The map's figure, made once per what it shows: making one of 60,000 points takes half a second, and a key
    (an undo, a verdict in the dialog) or a selection redraws the page without changing it."""
    # what the figure shows names it in the cache, and the same snapshot of the verdicts draws it
    if values is not None:
        shown = ("influence", query, digest(np.ascontiguousarray(values).tobytes()))
        groups = partial(groups_by_influence, run, layout, values, query)
    elif colouring == "flag":
        flags = annotations().flags(run.run_id)
        kinds = sorted((example_id, flag.kind) for example_id, flag in flags.items())
        shown, groups = ("flag", digest(repr(kinds).encode())), partial(groups_by_flag, run, layout, flags)
    else:
        shown, groups = ("label", show_test), partial(groups_by_label, run, layout, show_test)

    def make() -> go.Figure:
        drawn = groups()
        if linked is not None:
            drawn.append(linked_group(run, layout, linked))
        return embedding_map(drawn, colour_title="score")

    return remembered(("map_figure", *run_key(run), checkpoint, linked, MAX_DRAWN, *shown), make)


def selection_key(run: Run) -> str:
    """Session-state key of the examples chosen on the run's map: {"train": [indices], "test": [indices]} (absent: none)."""
    return f"map_selection_{run.run_id}"


def take_selection(run: Run, sampled: MapLayout | None) -> None:
    """The map's box, lasso or click callback: keep the chosen examples (kept while the colouring changes); none clears it.

    sampled: the layout when the map draws a sample of the training set: a box or lasso then chooses every training example
    inside it, drawn or not (plotly reports only the drawn points).
    """
    event = st.session_state.get(CHART_KEY)
    chosen = chosen_examples(event.selection if event is not None else {}, None if sampled is None else sampled.train)
    if chosen["train"] or chosen["test"]:
        st.session_state[selection_key(run)] = chosen
    else:
        clear_selection(run)


def clear_selection(run: Run) -> None:
    """Forget the map's selection (a callback)."""
    st.session_state.pop(selection_key(run), None)


def open_example(index: int) -> None:
    """Open training example `index` in the dialog (a grid button callback)."""
    st.session_state[OPEN_KEY] = index


def close_example() -> None:
    """Close the example dialog."""
    st.session_state.pop(OPEN_KEY, None)


@st.dialog("Training example", width="large", on_dismiss=close_example)
def example_dialog(run: Run, index: int, values: np.ndarray | None, legend: str | None) -> None:
    """A training example large, with its label, marks, its score when the map is coloured by one, and the verdict buttons."""
    train_set, _ = run.datasets()
    left, right = st.columns([1, 1.6], gap="large")
    left.image(enlarged(train_set.images[index], 260))
    with right:
        st.markdown(f"**Training example #{index}** (id {int(train_set.ids[index])})")
        st.markdown(f"**Label** {class_name(train_set, int(train_set.y[index]))}")
        original = flipped_from(train_set, index)
        if original is not None:
            st.warning(f"This label was flipped on purpose; the true class is {class_name(train_set, original)}.")
        if values is not None:
            st.markdown(f"**Score** {values[index]:+.4g}")
            st.caption(legend)
        st.markdown(marks(train_set, index, annotations().flags(run.run_id).get(int(train_set.ids[index]))))
    if flag_controls(run.run_id, train_set, index, key="map_open", shortcuts=True) is not None:
        close_example()
        st.rerun()


def render_bulk(run: Run, train: list[int]) -> None:
    """Flag every selected training example at once (one undoable action: the undo button beside the map takes it back)."""
    train_set, _ = run.datasets()
    with st.container(border=True, key="map_bulk"):
        columns = st.columns([1.4, 1], vertical_alignment="bottom")
        with columns[0]:
            kind = kind_choice(key="map_bulk_kind", label="Flag the selected training examples as")
        with columns[1]:
            # "mislabeled" saves the class the run's default ranking suggests, as on Mislabels (none until it is stored)
            ranking = stored_default_ranking(run) if kind == "mislabeled" else None
            bulk_flag_button(run.run_id, train_set, train, kind, key="map_flag_selection", noun="selected", ranking=ranking)


def render_selection(run: Run, values: np.ndarray | None, legend: str | None, linked: int | None) -> None:
    """The selected training examples (or the linked one) as a grid to open, with bulk flagging; scores when coloured by influence."""
    chosen = st.session_state.get(selection_key(run), {"train": [], "test": []})
    train, test = list(chosen["train"]), list(chosen["test"])
    train_set, _ = run.datasets()
    if not train and not test:
        if linked is None:
            st.caption("Draw a box or lasso on the map, or click a point, to see the examples inside it. Dragging draws a "
                       "box; for a lasso, choose it in the chart's toolbar (top right), then draw around the points.")
            return
        st.markdown(f"**Linked example:** training example #{linked}, the star on the map. "
                    "Draw a box or lasso, or click a point, to see others.")
        train = [linked]
    else:
        text_column, clear_column = st.columns([4, 1], vertical_alignment="center")
        text_column.markdown(f"**Selection:** {len(train)} training examples, {len(test)} test samples"
                             + (f" (showing the first {MAX_SELECTION_SHOWN})" if len(train) > MAX_SELECTION_SHOWN else ""))
        clear_column.button("Clear selection", key="map_clear_selection", icon=":material/close:", on_click=clear_selection,
                            args=(run,))
    if legend is not None:
        st.caption(legend)
    if train:
        render_bulk(run, train)
    shown = np.array(train[:MAX_SELECTION_SHOWN], dtype=int)
    image_grid(train_items(train_set, shown, None if values is None else values[shown], annotations().flags(run.run_id)),
               columns=SELECTION_COLUMNS, key="map_selection", image_size=72, bordered=False, button_label="Open", on_click=open_example)
    if test:
        st.caption("Test samples in the selection: " + ", ".join(f"#{index}" for index in test[:50]))


def render() -> None:
    """The Map page."""
    page = page_prelude("Map")
    run, train_set, test_set, predictions = page.run, page.train_set, page.test_set, page.predictions
    linked = linked_example(len(train_set))
    controls = st.columns([1.6, 1.2, 0.8], vertical_alignment="bottom")  # the colourings' three words whole at 1280 px
    colouring = controls[0].segmented_control("Colour by", COLOURINGS, default="label", key="map_colour", required=True)
    checkpoint = controls[1].selectbox("Features of checkpoint", range(len(run.checkpoints)), index=len(run.checkpoints) - 1,
                                       format_func=lambda index: checkpoint_label(run, index), key="map_checkpoint")
    show_test = controls[2].toggle("Show test samples", value=True, key="map_show_test", disabled=colouring != "label")
    values, query, legend = None, None, None
    if colouring == "influence on a test sample":
        row = st.columns([1.5, 1, 1.5])
        query = query_selectbox(test_set, predictions, row[0])
        chosen = chosen_attribution(run, query, row[1], row[2])  # the query's scores only (one row); None while they are computed
        if chosen is not None:
            values = chosen.scores.values[0]
            legend = score_legend(method_label(chosen.method), class_name(test_set, int(chosen.scores.query_labels[0])))
    layout = call_or_report(embedding, run, checkpoint)
    if layout is None:
        return
    map_column, side_column = st.columns([2.2, 1], gap="large")
    with map_column:
        st.plotly_chart(map_figure(run, layout, checkpoint, colouring, show_test, linked, values, query), key=CHART_KEY,
                        on_select=partial(take_selection, run, layout if len(train_set) > MAX_DRAWN else None),
                        selection_mode=("points", "box", "lasso"))
    with side_column:
        undo_button(run.run_id, key="map_undo")
        if query is not None:
            query_card(test_set, predictions, query, size=120)
        if legend is not None:
            st.caption("Colour: blue = proponents, red = opponents; the shade is the rank of the score's size among all "
                       "training examples: the darkest tenth are the tenth with the largest scores, near-white is near 0 "
                       f"(the bar gives the scores). {legend}")
        st.caption(f"UMAP of the inputs of the last linear layer at {checkpoint_label(run, checkpoint)}: "
                   f"{len(train_set)} training examples (circles) and {len(test_set)} test samples (diamonds). "
                   "Nearby points look alike to the model.")
        if len(train_set) > MAX_DRAWN or len(test_set) > MAX_DRAWN:
            st.caption(f"Drawn: a fixed random {MAX_DRAWN:,} of each split's points, with every verdict when coloured by flag and "
                       "the strongest scores when coloured by influence; a box or lasso selects the training examples inside it "
                       "among all of them.")
    render_selection(run, values, legend, linked)
    if OPEN_KEY in st.session_state:
        example_dialog(run, st.session_state[OPEN_KEY], values, legend)


render()
