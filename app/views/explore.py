"""Explore: pick a test sample and see which training examples pushed its prediction up (proponents) or down (opponents)."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image

from app.components import charts
from app.components.core_calls import annotations, call_or_report, method_label, predict, remembered, run_key
from app.components.examples import class_name, flipped_from, score_legend, train_items
from app.components.flagging import flag_controls
from app.components.images import current_page, enlarged, image_grid
from app.components.jobs import job_result
from app.components.methods import segment_labels, segment_range, segmented_methods
from app.components.page import chosen_attribution, page_prelude
from app.components.progress import progress_bar
from app.components.queries import query_card, query_grid_item, query_order, query_selectbox, select_query
from attribution_core.api import METHODS, QueryBatch, attribute
from attribution_core.data import UPLOAD_LIMIT_MB, image_to_input, read_uploaded_image
from attribution_core.evaluation.counterfactual import CounterfactualSettings
from attribution_core.jobs.kinds import counterfactual_job, fit_job
from attribution_core.run import Run
from attribution_core.scores import Scores

PICKER_COLUMNS, PICKER_ROWS = 12, 1
RESULT_COLUMNS = 10
INSPECT_KEY = "inspect"
UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "gif", "webp"]
REMOVAL_FRACTIONS = {"1 %": 0.01, "5 %": 0.05, "10 %": 0.1}


def filtered_queries(test_set, predictions: pd.DataFrame) -> list[int]:
    """Test indices that pass the picker's filters, mispredictions first."""
    classes = list(range(len(test_set.class_names)))
    columns = st.columns([1.7, 1.8, 1.8, 2], vertical_alignment="bottom")
    wrong_only = columns[0].toggle("Mispredictions only", key="filter_wrong")
    true_classes = columns[1].multiselect("True class", classes, format_func=lambda c: class_name(test_set, c),
                                          key="filter_true", placeholder="any")
    predicted_classes = columns[2].multiselect("Predicted class", classes, format_func=lambda c: class_name(test_set, c),
                                               key="filter_predicted", placeholder="any")
    low, high = columns[3].slider("Confidence of the prediction", 0.0, 1.0, (0.0, 1.0), 0.05, key="filter_confidence")
    keep = predictions["confidence"].between(low, high)
    if wrong_only:
        keep &= ~predictions["correct"]
    if true_classes:
        keep &= predictions["true"].isin(true_classes)
    if predicted_classes:
        keep &= predictions["predicted"].isin(predicted_classes)
    return [index for index in query_order(predictions) if keep.iloc[index]]


def render_picker(test_set, predictions: pd.DataFrame, selected: int) -> None:
    """A filterable, paged grid of test samples; a sample's button makes it the query."""
    n_wrong = int((~predictions["correct"]).sum())
    with st.expander(f"Test samples: {len(predictions)}, of which {n_wrong} mispredictions (listed first)", expanded=True,
                     icon=":material/grid_view:"):
        candidates = filtered_queries(test_set, predictions)
        if not candidates:
            st.info("No test sample matches these filters.")
            return
        shown = current_page(len(candidates), PICKER_COLUMNS * PICKER_ROWS, key="picker_page", max_visible_pages=9)
        image_grid([query_grid_item(test_set, predictions, candidates[position]) for position in shown],
                   columns=PICKER_COLUMNS, key="pick", button_label="Explain", button_icon=":material/manage_search:",
                   on_click=select_query, selected=selected, image_size=84, bordered=False)


def close_inspector() -> None:
    """Forget which training example is open in the dialog."""
    st.session_state.pop(INSPECT_KEY, None)


def open_inspector(grid: str, index: int) -> None:
    """Open the dialog of training example `index` shown in results grid `grid` (a button callback)."""
    st.session_state[INSPECT_KEY] = (grid, index)


@st.dialog("Training example", width="large", on_dismiss=close_inspector)
def inspector(run: Run, scores_: Scores, row: int, index: int) -> None:
    """A training example large, with its label, score and rank for the query in row `row` of the scores, and the verdict buttons."""
    train_set, _ = run.datasets()
    values = scores_.values[row]
    label = class_name(train_set, int(scores_.query_labels[row]))
    rank = int((values > values[index]).sum()) + 1
    left, right = st.columns([1, 1.6], gap="large")
    left.image(enlarged(train_set.images[index], 260))
    with right:
        st.markdown(f"**Training example #{index}** (id {int(train_set.ids[index])})")
        st.markdown(f"**Label** {class_name(train_set, int(train_set.y[index]))}")
        original = flipped_from(train_set, index)
        if original is not None:
            st.warning(f"This label was flipped on purpose; the true class is {class_name(train_set, original)}.")
        st.markdown(f"**Score for {scores_.query_names[row]}** {values[index]:+.4g} "
                    f"(rank {rank} of {len(values)}; positive = raised the margin of *{label}*)")
        if scores_.self_influence is not None:
            st.markdown(f"**Self-influence** {scores_.self_influence[index]:.4g}")
    if flag_controls(run.run_id, train_set, index, key=f"inspect_{index}") is not None:
        close_inspector()
        st.rerun()


def render_results(run: Run, query_scores: Scores, row: int, k: int, *, key: str) -> None:
    """Top proponents and opponents of one row of the scores as image grids with score, label and marks.

    A cell's open button shows that training example in a dialog, where it can be flagged.
    """
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    label = class_name(train_set, int(query_scores.query_labels[row]))
    legend = score_legend(method_label(query_scores.method), label)
    for side, title, (indices, values) in (
        ("proponents", f"Proponents: training examples that raised the margin of *{label}*", query_scores.top_proponents(row, k)),
        ("opponents", "Opponents: training examples that lowered it", query_scores.top_opponents(row, k)),
    ):
        st.markdown(f"#### {title}")
        st.caption(legend)
        image_grid(train_items(train_set, indices, values, flags), columns=RESULT_COLUMNS, key=f"{key}_{side}",
                   button_label="Open", on_click=lambda index: open_inspector(key, index), bordered=False)
    grid, index = st.session_state.get(INSPECT_KEY, (None, None))
    if grid == key:
        inspector(run, query_scores, row, index)


def render_segments(run: Run, query_scores: Scores, row: int, labels: list[str], k: int) -> None:
    """How each training segment contributed to the shown proponents' and opponents' scores (methods with segments)."""
    if not METHODS[query_scores.method].has_segments:
        st.info(f"Only {segmented_methods()} splits its scores by training segment: choose it as the method to see them.")
        return
    indices = np.concatenate([query_scores.top_proponents(row, k)[0], query_scores.top_opponents(row, k)[0]])
    contributions = query_scores.segment_values[:, row, indices]
    st.plotly_chart(charts.segment_contributions(labels, [f"#{i}" for i in indices], contributions), key="segments_chart")
    totals = query_scores.segment_values[:, row, :].sum(axis=1)
    st.caption("Sum over all training examples, per segment: " + " · ".join(
        f"{label.split(' · ')[0]} {total:+.3g}" for label, total in zip(labels, totals)))


def counterfactual_summary(result, test_set) -> str:
    """The counterfactual result in one sentence."""
    base = float(np.mean(result.base_margins))
    proponents = base + result.margin_change("proponents")
    randoms = [kind for kind in result.margins if kind.startswith("random_")]
    flip = any(result.flipped("proponents"))
    after_class = class_name(test_set, result.predictions["proponents"][0])
    text = (f"Removing the top {result.k} proponents and retraining moved the margin from **{base:+.2f}** to "
            f"**{proponents:+.2f}**" + (f", and the prediction flipped to **{after_class}**." if flip else "."))
    if randoms:
        random_change = float(np.mean([result.margin_change(kind) for kind in randoms]))
        text += f" Removing {result.k} random examples moved it by **{random_change:+.2f}** on average ({len(randoms)} draws)."
    return text


def render_counterfactual(run: Run, query: int, method: str, checkpoints: tuple[int, ...]) -> None:
    """Remove the query's top proponents, retrain, and compare the margin with random removals."""
    st.markdown("Remove this sample's top proponents from the training set, retrain the whole pipeline with the same "
                "recipe and seed, and see what happens to its margin, against removing as many random examples.")
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    fraction = left.segmented_control("Examples removed (share of the training set)", list(REMOVAL_FRACTIONS), default="5 %",
                                      key="counterfactual_k", required=True)
    spec = counterfactual_job(run, query, method, list(checkpoints), CounterfactualSettings(k=REMOVAL_FRACTIONS[fraction]))
    pressed = right.button("Remove and retrain", icon=":material/replay:", key="counterfactual_run", type="primary")
    result = call_or_report(job_result, run, spec, submit=pressed)  # stored, or the job's panel once asked for
    if result is None:
        return
    _, test_set = run.datasets()
    st.markdown(counterfactual_summary(result, test_set))
    base = float(np.mean(result.base_margins))
    after = {removal_name(kind): base + result.margin_change(kind) for kind in result.margins}
    flipped = {removal_name(kind): any(result.flipped(kind)) for kind in result.margins}
    st.plotly_chart(charts.counterfactual_margins(base, after, flipped), key="counterfactual_chart")


def removal_name(kind: str) -> str:
    """'top proponents removed', 'top opponents removed' or 'random draw 2' for a counterfactual removal kind."""
    return f"top {kind} removed" if kind in ("proponents", "opponents") else f"random draw {kind.removeprefix('random_')}"


def read_upload(uploaded) -> Image.Image | None:
    """The uploaded file as an image, or None after a clear error (too large, not an image)."""
    return call_or_report(read_uploaded_image, uploaded.name, uploaded.getvalue(), UPLOAD_LIMIT_MB)


def upload_scores_cached(run: Run, method: str, checkpoints: tuple[int, ...], x: torch.Tensor, label: int, uploaded) -> Scores | None:
    """Scores of an uploaded image for one class, computed once per (run, method, checkpoints, file content, class).

    The method's fit is a job (None while it runs, its panel shown); the image's own scores are one
    gradient and a product against the stored fit, computed here.
    """
    if job_result(run, fit_job(run, method, list(checkpoints))) is None:
        return None

    def compute() -> Scores:
        with progress_bar(f"{method_label(method)}: scoring the uploaded image") as progress:
            return attribute(run, method, queries=QueryBatch(x, torch.tensor([label]), [f"upload {uploaded.name}"]),
                             checkpoints=list(checkpoints), progress=progress)

    digest = hashlib.sha256(uploaded.getvalue()).hexdigest()
    return remembered(("upload", *run_key(run), method, checkpoints, digest, label), compute)


def render_upload(run: Run, method: str, checkpoints: tuple[int, ...], k: int) -> None:
    """Query an uploaded image against the run: its prediction, proponents and opponents."""
    uploaded = st.file_uploader(f"An image to explain (PNG, JPEG, … up to {UPLOAD_LIMIT_MB} MB)", type=UPLOAD_TYPES,
                                max_upload_size=UPLOAD_LIMIT_MB, key="upload")
    if uploaded is None:
        return
    image = read_upload(uploaded)
    if image is None:
        return
    train_set, _ = run.datasets()
    x = call_or_report(image_to_input, image, like=train_set)
    if x is None:
        return
    predicted, confidence = predict(run, x)
    left, right = st.columns([1, 2.4], vertical_alignment="center")
    left.image(enlarged(np.asarray(image.convert("L" if train_set.images.ndim == 3 else "RGB")), 140), caption=uploaded.name)
    with right:
        st.markdown(f"**Predicted** {class_name(train_set, predicted)} ({confidence:.0%})")
        label = st.selectbox("Explain the margin of class", range(len(train_set.class_names)), index=predicted,
                             format_func=lambda c: class_name(train_set, c), key="upload_label")
    upload_scores = call_or_report(upload_scores_cached, run, method, checkpoints, x, label, uploaded)
    if upload_scores is not None:
        render_results(run, upload_scores, 0, k, key="upload_results")


def render() -> None:
    """The Explore page."""
    page = page_prelude("Explore")
    run, test_set, predictions = page.run, page.test_set, page.predictions
    query_column, method_column, settings_column = st.columns([1.1, 1, 1], gap="large", vertical_alignment="bottom")
    query = query_selectbox(test_set, predictions, query_column)
    k = settings_column.slider("Examples shown", 5, 20, 10, 5, key="shown")
    render_picker(test_set, predictions, query)
    card_column, range_column = st.columns([1.1, 2], gap="large", vertical_alignment="center")
    with card_column:
        query_card(test_set, predictions, query)
    chosen = chosen_attribution(run, query, method_column, range_column)
    if chosen is None:  # its job's panel is shown: the picker above stays usable meanwhile
        return
    method, checkpoints, query_scores = chosen.method, chosen.checkpoints, chosen.scores  # one row: the query's
    labels: list[str] = []
    if METHODS[method].has_segments:
        labels = segment_labels(run, query_scores.segment_values.shape[0])
        chosen_segments = segment_range(method, labels, range_column)
        if len(chosen_segments) < len(labels):
            query_scores = query_scores.restricted_to_segments(chosen_segments)
            labels = [labels[number] for number in chosen_segments]
    for note in query_scores.notes:
        st.caption(f":material/info: {note}")
    render_results(run, query_scores, 0, k, key="results")
    counterfactual_tab, segments_tab, upload_tab = st.tabs(
        ["Counterfactual check", f"Segments ({segmented_methods()})", "Query your own image"])
    with counterfactual_tab:
        render_counterfactual(run, query, method, checkpoints)
    with segments_tab:
        render_segments(run, query_scores, 0, labels, k)
    with upload_tab:
        render_upload(run, method, checkpoints, k)


render()
