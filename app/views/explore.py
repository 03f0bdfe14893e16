"""Explore: pick a test sample and see which training examples pushed its prediction up (proponents) or down (opponents).

Keyboard first: N / P move to the next or previous test sample (in the picker's order and filters),
O opens the strongest proponent not yet reviewed, S finds the training examples most similar to the
sample, U undoes this tab's last flag. In a training example's window: M / A / O / F give a verdict
and move on, N / P the next or previous example of the grid, S finds similar examples, G shows it on
the Map.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import streamlit as st
import torch
from PIL import Image

from app.components import charts
from app.components.core_calls import annotations, call_or_report, method_label, predict, remembered, run_key
from app.components.examples import (
    UNREVIEWED,
    ScoreMeaning,
    class_name,
    flipped_from,
    train_item,
    train_items,
    verdicts,
)
from app.components.flagging import UNDO_KEY, flag_controls, undo_button, verdict_keys_text
from app.components.images import current_page, enlarged, example_card, image_grid
from app.components.jobs import job_result
from app.components.methods import checkpoint_label, segment_labels, segment_range
from app.components.page import chosen_attribution, page_prelude
from app.components.progress import progress_bar
from app.components.queries import query_card, query_grid_item, query_order, query_selectbox, select_query
from app.components.review import review_filters
from attribution_core import inspection
from attribution_core.api import METHODS, QueryBatch, attribute
from attribution_core.data import (
    UPLOAD_LIMIT_MB,
    image_to_input,
    input_conversion,
    input_to_image,
    read_uploaded_image,
    typical_pixel_range,
    unlike_training,
)
from attribution_core.evaluation.counterfactual import CounterfactualResult, CounterfactualSettings
from attribution_core.jobs.kinds import counterfactual_job, fit_job, representations_job, smoothness_job
from attribution_core.runs.capabilities import capabilities
from attribution_core.runs.run import Run
from attribution_core.scores import Scores

PICKER_COLUMNS, PICKER_ROWS = 12, 1
RESULT_COLUMNS = 10
SIMILAR_SHOWN = 10
INSPECT_KEY = "inspect"
"""Session state: (grid key, training index) of the example open in the dialog."""
SIMILAR_KEY = "similar"
"""Session state: (split, index, query) of the example whose most similar training examples are shown, asked while `query` was chosen."""
UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "gif", "webp"]
REMOVAL_FRACTIONS = {"1 %": 0.01, "5 %": 0.05, "10 %": 0.1}
NEXT_KEY, PREVIOUS_KEY, OPEN_KEY, SIMILAR_SHORTCUT, MAP_SHORTCUT = "N", "P", "O", "S", "G"
"""Page: next / previous test sample, open the next proponent, similar examples. Dialog: next / previous example, similar, map.
U (flagging.UNDO_KEY) undoes on both. The page's buttons are disabled while the dialog is open, so a key never does two
things (Streamlit reserves C and R)."""
MAP_PAGE, MAP_EXAMPLE_PARAM = "views/map.py", "example"
"""The Map page, and its URL parameter naming the training example it marks (views/map.py EXAMPLE_PARAM)."""


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


def render_picker(test_set, predictions: pd.DataFrame, selected: int) -> list[int]:
    """A filterable, paged grid of test samples; a sample's button makes it the query. Returns the filtered order."""
    n_wrong = int((~predictions["correct"]).sum())
    with st.expander(f"Test samples: {len(predictions)}, of which {n_wrong} mispredictions (listed first)", expanded=True,
                     icon=":material/grid_view:"):
        candidates = filtered_queries(test_set, predictions)
        if not candidates:
            st.info("No test sample matches these filters.")
            return candidates
        shown = current_page(len(candidates), PICKER_COLUMNS * PICKER_ROWS, key="picker_page", max_visible_pages=9)
        image_grid([query_grid_item(test_set, predictions, candidates[position]) for position in shown],
                   columns=PICKER_COLUMNS, key="pick", button_label="Explain", button_icon=":material/manage_search:",
                   on_click=go_to_query, selected=selected, image_size=84, bordered=False)
    return candidates


def go_to_query(index: int) -> None:
    """Make test sample `index` the query, with no example window open (a button callback)."""
    select_query(index)
    close_inspector()


def close_inspector() -> None:
    """Forget which training example is open in the dialog."""
    st.session_state.pop(INSPECT_KEY, None)


def open_inspector(grid: str, index: int) -> None:
    """Open the dialog of training example `index` shown in grid `grid` (a button callback)."""
    st.session_state[INSPECT_KEY] = (grid, int(index))


def order_key(grid: str) -> str:
    """Session state: the training indices grid `grid` shows, in its order (what the dialog's N / P walk through)."""
    return f"order_{grid}"


def step_inspector(grid: str, index: int, step: int) -> None:
    """Open the example `step` places after `index` in its grid's order, or close the dialog past the end (a callback)."""
    order = st.session_state.get(order_key(grid), [])
    position = order.index(index) + step if index in order else -1
    if 0 <= position < len(order):
        open_inspector(grid, order[position])
    else:
        close_inspector()


def find_similar(split: str, index: int, query: int) -> None:
    """Show the training examples most similar to one example (a button callback); closes the dialog."""
    st.session_state[SIMILAR_KEY] = (split, int(index), int(query))
    close_inspector()


def clear_similar() -> None:
    """Stop showing similar examples (a button callback)."""
    st.session_state.pop(SIMILAR_KEY, None)


@st.dialog("Training example", width="large", on_dismiss=close_inspector)
def inspector(run: Run, scores_: Scores, row: int, query: int | None) -> None:
    """The open training example large, with its label, its score for the query in row `row` in words, and the review keys.

    The example is read from session state, not from arguments: the dialog's own keys (a verdict, N, P)
    move it to another example by rerunning the dialog alone. query: the test index (None for an upload).
    """
    if INSPECT_KEY not in st.session_state:  # a verdict on the grid's last example closed it: the page draws no dialog
        st.rerun()
    grid, index = st.session_state[INSPECT_KEY]
    train_set, _ = run.datasets()
    meaning = ScoreMeaning(scores_.method, class_name(train_set, int(scores_.query_labels[row])), scores_.values[row])
    order = st.session_state.get(order_key(grid), [index])
    with example_card(train_set.images[index], size=260, alt=f"#{index}"):
        where = f" · {order.index(index) + 1} of {len(order)} in this grid" if index in order else ""
        st.markdown(f"**Training example #{index}** (id {int(train_set.ids[index])}){where}")
        st.markdown(f"**Label** {class_name(train_set, int(train_set.y[index]))}")
        original = flipped_from(train_set, index)
        if original is not None:
            st.warning(f"This label was flipped on purpose; the true class is {class_name(train_set, original)}.")
        st.markdown(f"**Score for {scores_.query_names[row]}** {meaning.explanation(index)}")
        if scores_.self_influence is not None:
            st.markdown(f"**Self-influence** {scores_.self_influence[index]:.4g}")
    position = order.index(index) if index in order else None
    moves = st.columns(4 if query is not None else 3)
    moves[0].button("Previous", key="inspect_previous", icon=":material/arrow_back:", shortcut=PREVIOUS_KEY, width="stretch",
                    disabled=not position, on_click=step_inspector, args=(grid, index, -1))
    moves[1].button("Next", key="inspect_next", icon=":material/arrow_forward:", shortcut=NEXT_KEY, width="stretch",
                    disabled=position is None or position == len(order) - 1, on_click=step_inspector, args=(grid, index, 1))
    if query is not None:
        moves[2].button("Find similar", key="inspect_similar", icon=":material/image_search:", shortcut=SIMILAR_SHORTCUT,
                        width="stretch", on_click=find_similar, args=("train", index, query),
                        help="The training examples the model sees as most alike (cosine of its penultimate-layer representations)")
    if moves[-1].button("Show on map", key="inspect_map", icon=":material/scatter_plot:", shortcut=MAP_SHORTCUT, width="stretch",
                        help="Open the Map with this training example marked"):
        st.switch_page(MAP_PAGE, query_params={"run": run.run_id, MAP_EXAMPLE_PARAM: str(index)})
    # a verdict moves to the grid's next example, as on Mislabels (past the last one the dialog closes)
    flag_controls(run.run_id, train_set, index, key="inspect", shortcuts=True, on_saved=lambda _kind: step_inspector(grid, index, 1))
    undo_column, keys_column = st.columns([1, 3], vertical_alignment="center")
    with undo_column:
        undo_button(run.run_id, key="inspect_undo")
    keys_column.caption("Keys: " + verdict_keys_text()
                        + f" (then the next example) · **{NEXT_KEY}** / **{PREVIOUS_KEY}** next / previous · "
                        + (f"**{SIMILAR_SHORTCUT}** similar · " if query is not None else "")
                        + f"**{MAP_SHORTCUT}** map · **{UNDO_KEY}** undo · **Esc** close")


def render_results(run: Run, query_scores: Scores, row: int, k: int, *, key: str, query: int | None) -> np.ndarray:
    """Top proponents and opponents of one row of the scores as image grids, filtered and ordered by the review controls.

    A cell's open button shows that training example in a dialog, where it can be flagged. Returns
    the proponents shown, in their order. query: the test index of the row (None for an upload).
    """
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    label = class_name(train_set, int(query_scores.query_labels[row]))
    meaning = ScoreMeaning(query_scores.method, label, query_scores.values[row])
    review = review_filters(train_set, flags, key=key)
    shown = {}
    for side, title, largest in (
        ("proponents", f"Proponents: training examples that raised the margin of *{label}*", True),
        ("opponents", "Opponents: training examples that lowered it", False),
    ):
        indices, _ = inspection.top_scores(meaning.values, k, keep=review.keep, largest=largest)
        shown[side] = review.ordered(train_set, indices)
        st.markdown(f"#### {title}")
        st.caption(meaning.legend(largest=largest))
        if not len(indices):
            st.caption("No training example matches these filters.")
            continue
        image_grid(train_items(train_set, shown[side], None, flags, meaning=meaning), columns=RESULT_COLUMNS, key=f"{key}_{side}",
                   button_label="Open", on_click=lambda index: open_inspector(key, index), bordered=False)
    st.session_state[order_key(key)] = [int(index) for index in (*shown["proponents"], *shown["opponents"])]
    grid, _ = st.session_state.get(INSPECT_KEY, (None, None))
    if grid == key:
        inspector(run, query_scores, row, query)
    return shown["proponents"]


def render_similar(run: Run, query_scores: Scores, query: int) -> None:
    """The training examples most similar to the chosen one (or to the query), by cosine of the final model's representations."""
    similar = st.session_state.get(SIMILAR_KEY)
    if similar is None or similar[2] != query:
        return
    split, index, _ = similar
    train_set, _ = run.datasets()
    with st.container(border=True, key="similar_panel"):
        title, close = st.columns([5, 1], vertical_alignment="center")
        what = f"training example #{index}" if split == "train" else f"test sample {index}"
        title.markdown(f"#### Most similar to {what}")
        close.button("Close", key="similar_close", icon=":material/close:", on_click=clear_similar, width="stretch")
        representations = call_or_report(job_result, run, representations_job(run, -1))  # computed once per run, then stored
        if representations is None:
            return
        indices, cosines = inspection.most_similar(representations, split, index, SIMILAR_SHOWN)
        st.caption(f"Cosine similarity (1 = alike) of what the model's classifier head sees (its penultimate-layer representations at "
                   f"{checkpoint_label(run, representations.checkpoint)}), over all {len(train_set):,} training examples. The tooltip of "
                   f"each gives its score for test sample {query}.")
        label = class_name(train_set, int(query_scores.query_labels[0]))
        meaning = ScoreMeaning(query_scores.method, label, query_scores.values[0])
        flags = annotations().flags(run.run_id)
        items = [train_item(train_set, int(neighbour), f"**cos {cosine:.3f}**", flags.get(int(train_set.ids[neighbour])),
                            tooltip=meaning.explanation(int(neighbour))) for neighbour, cosine in zip(indices, cosines)]
        image_grid(items, columns=RESULT_COLUMNS, key="similar", button_label="Open",
                   on_click=lambda chosen: open_inspector("similar", chosen), bordered=False)
    st.session_state[order_key("similar")] = [int(neighbour) for neighbour in indices]
    grid, _ = st.session_state.get(INSPECT_KEY, (None, None))
    if grid == "similar":
        inspector(run, query_scores, 0, query)


def render_review_keys(run: Run, candidates: list[int], query: int, proponents: np.ndarray) -> None:
    """The page's review buttons and their keys: previous / next test sample, open the next proponent, similar, undo."""
    train_set, _ = run.datasets()
    dialog_open = INSPECT_KEY in st.session_state  # its own keys rule then
    position = candidates.index(query) if query in candidates else None
    previous = candidates[position - 1] if position else None
    following = candidates[0] if position is None and candidates else (
        candidates[position + 1] if position is not None and position + 1 < len(candidates) else None)
    kinds = verdicts(train_set, annotations().flags(run.run_id))
    unreviewed = [int(index) for index in proponents if kinds[index] == UNREVIEWED]
    target = unreviewed[0] if unreviewed else (int(proponents[0]) if len(proponents) else None)
    columns = st.columns([1.25, 0.95, 1.9, 1.15, 1.9], vertical_alignment="center")  # each label whole at 1280 px
    columns[0].button("Previous", key="query_previous", icon=":material/arrow_back:", shortcut=PREVIOUS_KEY, width="stretch",
                      disabled=dialog_open or previous is None, on_click=go_to_query, args=(previous,),
                      help="The previous test sample in the picker's order")
    columns[1].button("Next", key="query_next", icon=":material/arrow_forward:", shortcut=NEXT_KEY, width="stretch",
                      disabled=dialog_open or following is None, on_click=go_to_query, args=(following,),
                      help="The next test sample in the picker's order")
    columns[2].button("Review proponents", key="open_next_proponent", icon=":material/rate_review:", shortcut=OPEN_KEY,
                      width="stretch", disabled=dialog_open or target is None, on_click=open_inspector, args=("results", target),
                      help="Open the strongest proponent not yet reviewed; in its window a verdict moves to the next")
    columns[3].button("Similar", key="query_similar", icon=":material/image_search:", shortcut=SIMILAR_SHORTCUT, width="stretch",
                      disabled=dialog_open, on_click=find_similar, args=("test", query, query),
                      help="The training examples the model sees as most alike to this test sample")
    with columns[4]:
        undo_button(run.run_id, key="explore_undo", disabled=dialog_open)


def render_segments(run: Run, query_scores: Scores, row: int, labels: list[str], k: int) -> None:
    """How each training segment contributed to the shown proponents' and opponents' scores (a method with segments)."""
    indices = np.concatenate([query_scores.top_proponents(row, k)[0], query_scores.top_opponents(row, k)[0]])
    contributions = query_scores.segment_values[:, row, indices]
    st.plotly_chart(charts.segment_contributions(labels, [f"#{i}" for i in indices], contributions), key="segments_chart")
    totals = query_scores.segment_values[:, row, :].sum(axis=1)
    st.caption("Sum over all training examples, per segment: " + " · ".join(
        f"{label.split(' · ')[0]} {total:+.3g}" for label, total in zip(labels, totals)))


def counterfactual_summary(result: CounterfactualResult, test_set, meaning: ScoreMeaning) -> str:
    """The counterfactual result in words: whose margin moved from what to what, what the method predicted, and the random baseline.

    meaning: the query's scores the removed proponents were chosen by (the method's, over the whole training set).
    """
    base = float(np.mean(result.base_margins))
    after = base + result.margin_change("proponents")
    whose = class_name(test_set, result.true_label)
    randoms = [kind for kind in result.margins if kind.startswith("random_")]
    flip = any(result.flipped("proponents"))
    text = (f"The margin of **{whose}** (the true class) moved from **{base:+.2f}** to **{after:+.2f}** when the top {result.k} "
            f"proponents were removed and the model retrained"
            + (f"; the prediction flipped to **{class_name(test_set, result.predictions['proponents'][0])}**." if flip else "."))
    if meaning.declared.estimates_removal:
        predicted = inspection.predicted_removal_change(meaning.values, result.removed["proponents"])
        direction = "lower" if predicted <= 0 else "raise"
        text += (f" Removing them was predicted to {direction} it by about **{abs(predicted):.2f}** (to {base + predicted:+.2f}; "
                 f"{meaning.declared.label}'s scores summed).")
    else:
        text += (f" {meaning.declared.label}'s scores are similarities: they chose the examples but predict no size for the "
                 "change.")
    if randoms:
        random_change = float(np.mean([result.margin_change(kind) for kind in randoms]))
        text += f" Removing {result.k} random examples instead moved it by **{random_change:+.2f}** on average ({len(randoms)} draws)."
    return text


def render_counterfactual(run: Run, query: int, query_scores: Scores, checkpoints: tuple[int, ...]) -> None:
    """Remove the query's top proponents, retrain, and compare the margin with the prediction and with random removals.

    query_scores: the query's row of the method's scores over every segment (what the check removes by).
    """
    method = query_scores.method
    st.markdown("Remove this sample's top proponents from the training set, train the run again by its own training function "
                "with the same seed, and see what happens to its margin, against removing as many random examples.")
    capability = capabilities(run)["retrain"]
    if not capability.supported:  # said before any click
        st.warning(f"This run cannot {capability.label}: {capability.reason}", icon=":material/block:")
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    fraction = left.segmented_control("Examples removed (share of the training set)", list(REMOVAL_FRACTIONS), default="5 %",
                                      key="counterfactual_k", required=True)
    spec = counterfactual_job(run, query, method, list(checkpoints), CounterfactualSettings(k=REMOVAL_FRACTIONS[fraction]))
    pressed = right.button("Remove and retrain", icon=":material/replay:", key="counterfactual_run", type="primary",
                           disabled=not capability.supported, help=capability.reason)
    result = call_or_report(job_result, run, spec, submit=pressed)  # stored, or the job's panel once asked for
    if result is None:
        return
    _, test_set = run.datasets()
    whose = class_name(test_set, result.true_label)
    meaning = ScoreMeaning(method, whose, query_scores.values[0])
    base = float(np.mean(result.base_margins))
    after = {removal_name(kind): base + result.margin_change(kind) for kind in result.margins}
    flipped = {removal_name(kind): any(result.flipped(kind)) for kind in result.margins}
    predicted = ({removal_name("proponents"): base + inspection.predicted_removal_change(meaning.values, result.removed["proponents"])}
                 if meaning.declared.estimates_removal else None)
    with st.container(border=True, key="counterfactual_result"):  # the sentence and its chart in one block, drawn together
        text_column, chart_column = st.columns([1, 1.5], gap="large", vertical_alignment="center")
        text_column.markdown(counterfactual_summary(result, test_set, meaning))
        chart_column.plotly_chart(charts.counterfactual_margins(base, after, flipped, predicted=predicted, class_label=whose),
                                  key="counterfactual_chart")


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


STATISTIC_WORDS = {"mean": "mean pixel value (brightness)", "standard deviation": "pixel standard deviation (contrast)"}
"""How the upload's warning names data.PIXEL_STATISTICS."""
TYPICAL_SHARE = 0.998
"""An upload is unlike the training images when a pixel statistic lies outside the range of this share of them."""


def render_upload_notes(image: Image.Image, x: torch.Tensor, run: Run) -> None:
    """What was done to an upload to make it a model input, and a warning when its pixels are unlike the training images'."""
    train_set, _ = run.datasets()
    conversion = input_conversion(image, train_set)
    if conversion["colour_dropped"]:
        st.caption(":material/info: Converted to grayscale: the model was trained on grayscale images.")
    if conversion["resized"]:
        (width, height), (input_width, input_height) = conversion["original_size"], conversion["input_size"]
        shape = ("its shape kept" if abs(conversion["original_aspect"] / conversion["input_aspect"] - 1) < 0.01 else
                 f"its width-to-height ratio changed from {conversion['original_aspect']:.3g} to {conversion['input_aspect']:.3g}")
        st.caption(f":material/info: Resized from {width}×{height} to {input_width}×{input_height} pixels, {shape}.")
    typical = remembered(("pixel_range", *run_key(run)), lambda: typical_pixel_range(train_set, TYPICAL_SHARE))
    unusual = unlike_training(x, typical)
    if unusual:
        st.warning("Unlike the training images: its " + "; its ".join(
            f"{STATISTIC_WORDS[name]} {value:.3g} is outside the range {low:.3g} to {high:.3g} of {TYPICAL_SHARE:.1%} of them"
            for name, (value, low, high) in unusual.items())
            + ". The prediction, and the examples behind it, say little about such an image.", icon=":material/warning:")


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
    original, seen, right = st.columns([1, 1, 2.4], vertical_alignment="center")
    original.image(enlarged(np.asarray(image.convert("RGB")), 140), caption=f"Yours: {uploaded.name}")
    seen.image(enlarged(input_to_image(x), 140), caption="What the model sees")
    with right:
        render_upload_notes(image, x, run)
        st.markdown(f"**Predicted** {class_name(train_set, predicted)} ({confidence:.0%})")
        label = st.selectbox("Explain the margin of class", range(len(train_set.class_names)), index=predicted,
                             format_func=lambda c: class_name(train_set, c), key="upload_label")
    upload_scores = call_or_report(upload_scores_cached, run, method, checkpoints, x, label, uploaded)
    if upload_scores is not None:
        render_results(run, upload_scores, 0, k, key="upload_results", query=None)


def render_smoothness(run: Run, query: int, method: str, checkpoints: tuple[int, ...]) -> None:
    """Whether first-order predictions hold here: random 1 % removals replayed in the recorded batch order, predicted against actual."""
    st.markdown("Remove a few random 1 % of the training set, train the run again in its own recorded batch order without them, and "
                f"compare the change of this sample's margin with what {method_label(method)}'s scores predict (minus the sum of "
                "the removed examples' scores). Points on the diagonal mean the scores add up as a linear model of training; "
                "a cloud means this run is not smooth enough for any first-order method here.")
    capability = capabilities(run)["order_keeping"]
    if not capability.supported:  # said before any click
        st.warning(f"This run cannot {capability.label}: {capability.reason}", icon=":material/block:")
    spec = smoothness_job(run, query, method, list(checkpoints))
    pressed = st.button("Replay random removals", icon=":material/scatter_plot:", key="smoothness_run",
                        disabled=not capability.supported, help=capability.reason)
    result = call_or_report(job_result, run, spec, submit=pressed)
    if result is None:
        return
    correlation = float(np.corrcoef(result.predicted, result.actual)[0, 1]) if len(result.actual) > 1 else float("nan")
    st.plotly_chart(charts.predicted_against_actual(result.predicted, result.actual, label=method_label(method)),
                    key="smoothness_chart")
    st.caption(f"{len(result.actual)} removals of {len(result.removed[0])} examples each; correlation of predicted and actual "
               f"{correlation:.2f}, actual changes {np.abs(result.actual).mean():.3g} on average against predicted "
               f"{np.abs(result.predicted).mean():.3g}.")


def render() -> None:
    """The Explore page."""
    page = page_prelude("Explore")
    run, test_set, predictions = page.run, page.test_set, page.predictions
    query_column, method_column, settings_column = st.columns([1.6, 1, 0.8], gap="large", vertical_alignment="bottom")
    query = query_selectbox(test_set, predictions, query_column)
    k = settings_column.slider("Examples shown", 5, 20, 10, 5, key="shown")
    candidates = render_picker(test_set, predictions, query)
    card_column, range_column = st.columns([1.1, 2], gap="large", vertical_alignment="center")
    with card_column:
        query_card(test_set, predictions, query)
    keys_row = st.container()  # drawn once the proponents are known
    chosen = chosen_attribution(run, query, method_column, range_column)
    if chosen is None:  # its job's panel is shown: the picker above stays usable meanwhile
        return
    method, checkpoints, query_scores = chosen.method, chosen.checkpoints, chosen.scores  # one row: the query's
    shown_scores, labels = query_scores, []
    if METHODS[method].has_segments:
        labels = segment_labels(run, query_scores.segment_values.shape[0])
        chosen_segments = segment_range(method, labels, range_column)
        if len(chosen_segments) < len(labels):
            shown_scores = query_scores.restricted_to_segments(chosen_segments)
            labels = [labels[number] for number in chosen_segments]
    for note in shown_scores.notes:
        st.caption(f":material/info: {note}")
    render_similar(run, shown_scores, query)
    proponents = render_results(run, shown_scores, 0, k, key="results", query=query)
    with keys_row:
        render_review_keys(run, candidates, query, proponents)
    smooth = METHODS[method].estimates_removal  # a similarity predicts no change to check
    tab_names = ["Counterfactual check", *(["Segments"] if labels else []), *(["Smoothness check"] if smooth else []),
                 "Query your own image"]
    tabs = dict(zip(tab_names, st.tabs(tab_names)))
    with tabs["Counterfactual check"]:
        render_counterfactual(run, query, query_scores, checkpoints)
    if labels:
        with tabs["Segments"]:
            render_segments(run, shown_scores, 0, labels, k)
    if smooth:
        with tabs["Smoothness check"]:
            render_smoothness(run, query, method, checkpoints)
    with tabs["Query your own image"]:
        render_upload(run, method, checkpoints, k)


render()
