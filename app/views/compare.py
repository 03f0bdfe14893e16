"""Compare: two to four methods side by side for one test sample, how far they agree, and how well each predicts retraining (LDS)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import streamlit as st

from app.components import charts
from app.components.agreement import agreement_sentence
from app.components.core_calls import annotations, call_or_report, method_choices, method_label, scores
from app.components.examples import train_items
from app.components.images import image_grid
from app.components.methods import checkpoint_label
from app.components.page import page_prelude
from app.components.progress import progress_bar
from app.components.queries import query_card, query_selectbox
from attribution_core.api import METHODS, default_checkpoints
from attribution_core.evaluation.lds import (
    LdsSettings,
    groundtruth,
    groundtruth_status,
    lds,
    load_groundtruth,
    stored_groundtruth_settings,
)
from attribution_core.run import Run

DEFAULT_SUBSETS = 50


def default_methods(choices: list[str]) -> list[str]:
    """The two methods Compare opens with: the first offered ones whose fitted state holds self-influence (TRAK, TracIn).

    No declaration names a default pair; this one keeps the pair the page has always opened on
    without a list of names in the app.
    """
    return [name for name in choices if METHODS[name].self_influence_at_fit][:2]


def method_scores(run: Run, methods: list[str]) -> dict:
    """Each method's scores of the whole test set at its default checkpoints (methods that fail are left out)."""
    computed = {}
    for method in methods:
        result = call_or_report(scores, run, method, tuple(default_checkpoints(run, method)))
        if result is not None:
            computed[method] = result
    return computed


def render_method_rows(run: Run, computed: dict, query: int, k: int) -> None:
    """One row per method: its top-k proponents of the query."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    for method, method_result in computed.items():
        first, last = method_result.checkpoints[0], method_result.checkpoints[-1]
        span = checkpoint_label(run, first) if first == last else f"{checkpoint_label(run, first)} to {checkpoint_label(run, last)}"
        with st.container(border=True):
            st.markdown(f"**{method_label(method)}** · top {k} proponents · {span}")
            indices, values = method_result.top_proponents(query, k)
            image_grid(train_items(train_set, indices, values, flags), columns=k, key=f"compare_{method}", image_size=64,
                       bordered=False)


def render_agreement(computed: dict, query: int, k: int) -> None:
    """Top-k overlap and rank correlation of every pair of methods, in words."""
    for first, second in itertools.combinations(computed, 2):
        st.markdown("- " + agreement_sentence(method_label(first), method_label(second),
                                              computed[first].values[query], computed[second].values[query], k))


def lds_settings_controls(run: Run) -> LdsSettings:
    """The ground truth's settings, preset to one already stored for the run."""
    stored = stored_groundtruth_settings(run)
    preset = stored[0] if stored else LdsSettings(n_subsets=DEFAULT_SUBSETS)
    left, right = st.columns(2)
    n_subsets = left.number_input("Random subsets (retrained models)", 2, 1000, preset.n_subsets, key="lds_subsets")
    alpha = right.slider("Share of the training set each subset keeps", 0.1, 0.9, float(preset.alpha), 0.05, key="lds_alpha")
    return LdsSettings(n_subsets=int(n_subsets), alpha=float(alpha), seed=preset.seed, seeds_per_subset=preset.seeds_per_subset)


def render_groundtruth_job(run: Run, settings: LdsSettings) -> None:
    """Progress of the ground truth so far, and a button that computes (or resumes) it."""
    done, total = groundtruth_status(run, settings)
    st.info(f"LDS needs the ground truth: {total} models retrained on random subsets. {done} of {total} exist"
            + (" (computing resumes from there)." if done else "."))
    if st.button(f"Compute the ground truth ({total - done} retrainings)", icon=":material/model_training:", key="lds_compute"):
        with progress_bar("Retraining on random subsets") as progress:
            truth = call_or_report(groundtruth, run, settings, progress=progress)
        if truth is not None:
            st.rerun()


def render_lds(run: Run, computed: dict, query: int) -> None:
    """LDS of each method with its standard error, and the scatter of the chosen test sample."""
    st.subheader("Linear datamodeling score")
    settings = lds_settings_controls(run)
    truth = call_or_report(load_groundtruth, run, settings)
    if truth is None:
        render_groundtruth_job(run, settings)
        return
    results = {method: call_or_report(lds, method_result, truth) for method, method_result in computed.items()}
    results = {method: result for method, result in results.items() if result is not None}
    if not results:
        return
    labels = [method_label(method) for method in results]
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown(f"**Mean over the test set** ({settings.n_subsets} subsets of {settings.alpha:.0%})")
        st.plotly_chart(charts.lds_bars(labels, [r.mean for r in results.values()], [r.stderr for r in results.values()]), key="lds_bars")
    series, rows = {}, []
    for method, result in results.items():
        row = int(np.flatnonzero(result.query_indices == query)[0])
        correlation = result.per_query[row]
        series[f"{method_label(method)} (ρ = {correlation:.2f})"] = (result.predicted[row], result.actual[row])
        rows.append({"method": method_label(method), "LDS": result.mean, "± s.e.": result.stderr,
                     f"test {query}": correlation, "queries": result.n_valid})
    with right:
        st.markdown(f"**Test {query}: predicted effect against the retrained margin**")
        st.plotly_chart(charts.lds_scatter(series), key="lds_scatter")
    st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
        column: st.column_config.NumberColumn(format="%.3f") for column in ("LDS", "± s.e.", f"test {query}")})


def render() -> None:
    """The Compare page."""
    page = page_prelude("Compare")
    run, test_set, predictions = page.run, page.test_set, page.predictions
    choices = method_choices(run)
    controls = st.columns([1.5, 2, 1])
    query = query_selectbox(test_set, predictions, controls[0])
    methods = controls[1].multiselect(
        "Methods (two to four)", choices, default=default_methods(choices), max_selections=4, format_func=method_label,
        key="compare_methods", help="Each method at its default checkpoints.")
    k = controls[2].slider("Top k", 5, 15, 10, key="compare_k")
    with st.columns([1, 2])[0]:
        query_card(test_set, predictions, query, size=120)
    if len(methods) < 2:
        st.info("Choose at least two methods to compare.")
        return
    computed = method_scores(run, methods)
    render_method_rows(run, computed, query, k)
    st.subheader("Agreement")
    render_agreement(computed, query, k)
    render_lds(run, computed, query)

render()
