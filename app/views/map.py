"""Map: training and test examples laid out by what the model sees (UMAP), coloured by label, flag or influence."""
from __future__ import annotations

import numpy as np
import streamlit as st

from app.components.charts import QUALITATIVE, PointGroup, embedding_map
from app.components.core_calls import annotations, call_or_report, method_label
from app.components.embedding import embedding
from app.components.examples import FLAG_COLOURS, class_name, score_legend, train_items
from app.components.images import image_grid
from app.components.methods import checkpoint_label
from app.components.page import chosen_attribution, page_prelude
from app.components.queries import query_card, query_selectbox
from attribution_core.inspection import MapLayout
from attribution_core.run import Run

COLOURINGS = ("label", "flag", "influence on a test sample")
MAX_SELECTION_SHOWN = 30


def hover_texts(dataset, split: str, indices: np.ndarray) -> list[str]:
    """'train #12 · Shirt' per point."""
    return [f"{split} #{index} · {class_name(dataset, int(dataset.y[index]))}" for index in indices]


def groups_by_label(run: Run, layout: MapLayout, show_test: bool) -> list[PointGroup]:
    """One trace per class and split (test samples as diamonds); one legend entry per class."""
    groups = []
    for split, dataset, positions, symbol in zip(("train", "test"), run.datasets(), (layout.train, layout.test), ("circle", "diamond")):
        if split == "test" and not show_test:
            continue
        labels = dataset.y.numpy()
        for label in np.unique(labels):
            indices = np.flatnonzero(labels == label)
            name = class_name(dataset, int(label))
            groups.append(PointGroup(name, split, indices, positions[indices], hover_texts(dataset, split, indices),
                                     colour=QUALITATIVE[int(label) % len(QUALITATIVE)], symbol=symbol,
                                     size=6 if split == "train" else 8, legend_group=name, show_legend=split == "train"))
    return groups


def groups_by_flag(run: Run, layout: MapLayout) -> list[PointGroup]:
    """Training examples grouped by their verdict (grey when none), flipped labels outlined separately."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    kinds = np.array([flags[int(i)].kind if int(i) in flags else "" for i in train_set.ids])
    groups = [PointGroup("no verdict", "train", np.flatnonzero(kinds == ""), layout.train[kinds == ""],
                         hover_texts(train_set, "train", np.flatnonzero(kinds == "")), colour="#D0D5DB", size=5)]
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
    """Training examples coloured by their score for the query (red opponents, blue proponents), the query as a star."""
    train_set, test_set = run.datasets()
    indices = np.arange(len(train_set))
    return [
        PointGroup("training examples", "train", indices, layout.train, hover_texts(train_set, "train", indices), values=values),
        PointGroup(f"test {query}", "test", np.array([query]), layout.test[[query]], hover_texts(test_set, "test", np.array([query])),
                   colour="#111111", symbol="star", size=18),
    ]


def selected_examples(event) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of the points chosen with the box or lasso."""
    points = event.selection.points if event is not None else []
    train = sorted({int(point["customdata"][1]) for point in points if point.get("customdata", [None])[0] == "train"})
    test = sorted({int(point["customdata"][1]) for point in points if point.get("customdata", [None])[0] == "test"})
    return train, test


def render_selection(run: Run, event, values: np.ndarray | None, legend: str | None) -> None:
    """The selected training examples as a grid (with their score on the query and its legend when coloured by influence)."""
    train, test = selected_examples(event)
    if not train and not test:
        st.caption("Draw a box or lasso on the map to see the examples inside it.")
        return
    train_set, _ = run.datasets()
    st.markdown(f"**Selection:** {len(train)} training examples, {len(test)} test samples"
                + (f" (showing the first {MAX_SELECTION_SHOWN})" if len(train) > MAX_SELECTION_SHOWN else ""))
    if legend is not None:
        st.caption(legend)
    shown = np.array(train[:MAX_SELECTION_SHOWN], dtype=int)
    image_grid(train_items(train_set, shown, None if values is None else values[shown], annotations().flags(run.run_id)),
               columns=10, key="map_selection", image_size=72, bordered=False)
    if test:
        st.caption("Test samples in the selection: " + ", ".join(f"#{index}" for index in test[:50]))


def render() -> None:
    """The Map page."""
    page = page_prelude("Map")
    run, train_set, test_set, predictions = page.run, page.train_set, page.test_set, page.predictions
    controls = st.columns([1.2, 1.2, 1])
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
    if values is not None:
        groups = groups_by_influence(run, layout, values, query)
    elif colouring == "flag":
        groups = groups_by_flag(run, layout)
    else:
        groups = groups_by_label(run, layout, show_test)
    map_column, side_column = st.columns([2.2, 1], gap="large")
    with map_column:
        event = st.plotly_chart(embedding_map(groups, colour_title="score"), key="map_chart", on_select="rerun",
                                selection_mode=("box", "lasso"))
    with side_column:
        if query is not None:
            query_card(test_set, predictions, query, size=120)
        if legend is not None:
            st.caption(f"Colour: blue = proponents, red = opponents. {legend}")
        st.caption(f"UMAP of the inputs of the last linear layer at {checkpoint_label(run, checkpoint)}: "
                   f"{len(train_set)} training examples (circles) and {len(test_set)} test samples (diamonds). "
                   "Nearby points look alike to the model.")
    render_selection(run, event, values, legend)


render()
