"""Compare: two to four methods side by side for one test sample, how far they agree, and how well each predicts retraining (LDS)."""
from __future__ import annotations

import itertools

import pandas as pd
import streamlit as st

from app.components import charts
from app.components.agreement import agreement_sentence
from app.components.core_calls import (
    annotations,
    call_or_report,
    first_queries_scores,
    method_choices,
    method_label,
    query_scores,
    unsupported_methods,
)
from app.components.examples import ScoreMeaning, class_name, train_items
from app.components.images import image_grid
from app.components.jobs import job_queue, job_result
from app.components.methods import checkpoint_label
from app.components.page import page_prelude
from app.components.queries import query_card, query_selectbox
from attribution_core.api import default_checkpoints
from attribution_core.evaluation.lds import (
    MODES,
    GroundTruth,
    LdsSettings,
    groundtruth_status,
    lds,
    stored_groundtruth_settings,
)
from attribution_core.jobs.kinds import groundtruth_job
from attribution_core.jobs.ready import FIRST_GROUND_TRUTH, LDS_QUERIES, compared_methods, large_run, quick_method
from attribution_core.jobs.worker import job_mode
from attribution_core.runs.capabilities import capabilities
from attribution_core.runs.run import Run
from attribution_core.scores import Scores

MODE_NAMES = {"reshuffled": "reshuffled", "order_keeping": "order-keeping"}
"""How the page names each ground-truth mode."""

NEW_GROUND_TRUTH = {"reshuffled": FIRST_GROUND_TRUTH, "order_keeping": LdsSettings(n_subsets=20, alpha=0.95, mode="order_keeping")}
"""What the controls open with in a mode the run stores no ground truth of (order-keeping: small, 5 % of the examples removed)."""

MODE_KEY, SUBSETS_KEY, ALPHA_KEY = "lds_mode", "lds_subsets", "lds_alpha"
PRESET_KEY = "lds_preset_for"
"""Session state: the (run, mode) the subset and share controls were last preset for."""


def method_scores(run: Run, methods: list[str], query: int) -> dict[str, Scores]:
    """Each method's scores of the query (one row; its block is scored on a miss) at its default checkpoints; failures left out."""
    computed = {}
    for method in methods:
        result = call_or_report(query_scores, run, method, tuple(default_checkpoints(run, method)), query)
        if result is not None:
            computed[method] = result
    return computed


def render_method_rows(run: Run, computed: dict[str, Scores], k: int) -> None:
    """One row per method: its top-k proponents of the query, with what its scores mean (a similarity's with their place)."""
    train_set, _ = run.datasets()
    flags = annotations().flags(run.run_id)
    for method, method_result in computed.items():
        first, last = method_result.checkpoints[0], method_result.checkpoints[-1]
        span = checkpoint_label(run, first) if first == last else f"{checkpoint_label(run, first)} to {checkpoint_label(run, last)}"
        with st.container(border=True):
            st.markdown(f"**{method_label(method)}** · top {k} proponents · {span}")
            meaning = ScoreMeaning(method, class_name(train_set, int(method_result.query_labels[0])), method_result.values[0])
            st.caption(meaning.legend())
            indices, _ = method_result.top_proponents(0, k)
            image_grid(train_items(train_set, indices, None, flags, meaning=meaning), columns=k, key=f"compare_{method}",
                       image_size=64, bordered=False)


def render_agreement(computed: dict[str, Scores], k: int) -> None:
    """Top-k overlap and rank correlation of every pair of methods on the query, in words."""
    for first, second in itertools.combinations(computed, 2):
        st.markdown("- " + agreement_sentence(method_label(first), method_label(second),
                                              computed[first].values[0], computed[second].values[0], k))


def mode_question(settings: LdsSettings) -> str:
    """The question a ground truth asks, in one sentence."""
    if settings.mode == "order_keeping":
        return (f"Order-keeping: the same batches with {1 - settings.alpha:.0%} of the examples weighted 0 — "
                "what replay differentiates.")
    kept = "random halves" if settings.alpha == 0.5 else f"random subsets of {settings.alpha:.0%}"
    return f"Reshuffled: retrain from scratch on {kept} of the training set."


def describe(settings: LdsSettings) -> str:
    """'reshuffled, 50 subsets of 50 %' (with the seed and seeds per subset where they are not the defaults)."""
    extras = ([f"seed {settings.seed}"] if settings.seed else []) + (
        [f"{settings.seeds_per_subset} seeds per subset"] if settings.seeds_per_subset > 1 else [])
    return f"{MODE_NAMES[settings.mode]}, {settings.n_subsets} subsets of {settings.alpha:.0%}" + "".join(f", {extra}" for extra in extras)


def preset_controls(run: Run, stored: list[LdsSettings]) -> None:
    """Give the mode, subsets and share controls their values before they draw: kept, unless the run or the mode changed."""
    state = st.session_state
    if state.get(PRESET_KEY, (None,))[0] != run.run_id or state.get(MODE_KEY) not in MODES:
        state[MODE_KEY] = stored[0].mode if stored else MODES[0]


def preset_sizes(run: Run, stored: list[LdsSettings], mode: str) -> LdsSettings:
    """The ground truth the mode opens with (the run's first stored one of that mode, else NEW_GROUND_TRUTH); presets the size controls."""
    preset = next((settings for settings in stored if settings.mode == mode), NEW_GROUND_TRUTH[mode])
    state = st.session_state
    if state.get(PRESET_KEY) != (run.run_id, mode) or SUBSETS_KEY not in state or ALPHA_KEY not in state:
        state[SUBSETS_KEY], state[ALPHA_KEY], state[PRESET_KEY] = preset.n_subsets, float(preset.alpha), (run.run_id, mode)
    return preset


def lds_settings_controls(run: Run) -> LdsSettings | None:
    """The ground truth's mode and size, preset to one stored for the run; None when the mode cannot be computed for it."""
    stored = stored_groundtruth_settings(run)
    listed = "; ".join(describe(settings) for settings in stored) if stored else "none yet."
    st.markdown("**Stored ground truths of this run:** " + listed)
    preset_controls(run, stored)
    mode_column, subsets_column, alpha_column = st.columns([1.2, 1, 1], vertical_alignment="bottom")
    mode = mode_column.segmented_control(
        "Ground truth", MODES, format_func=MODE_NAMES.get, key=MODE_KEY, required=True,
        help="Reshuffled: each subset retrained from scratch by the run's training function, its batches drawn anew (the "
             "classic LDS). Order-keeping: the run trained again in its own recorded batch order with the removed examples "
             "weighted 0, the question replay answers exactly.")
    preset = preset_sizes(run, stored, mode)
    n_subsets = subsets_column.number_input("Random subsets (retrained models)", 2, 1000, key=SUBSETS_KEY)
    alpha = alpha_column.slider("Share kept per subset", 0.05, 0.95, step=0.05, key=ALPHA_KEY,
                                help="The fraction of the training set each random subset keeps.")
    settings = LdsSettings(n_subsets=int(n_subsets), alpha=round(float(alpha), 6), seed=preset.seed,
                           seeds_per_subset=preset.seeds_per_subset if mode == "reshuffled" else 1, mode=mode)
    st.caption(mode_question(settings))
    return settings


def render_groundtruth(run: Run, settings: LdsSettings) -> GroundTruth | None:
    """The stored ground truth; else its job's progress, or what it needs and a button that queues it (resumes what exists)."""
    spec = groundtruth_job(run, settings)
    truth = call_or_report(job_result, run, spec, submit=False)  # stored, or the panel of the job asked for before
    if truth is not None or (job_mode() != "inline" and job_queue().get(spec.key) is not None):
        return truth
    done, total = groundtruth_status(run, settings)
    models = ("models retrained on random subsets" if settings.mode == "reshuffled" else
              f"retrainings in the recorded batch order, each with a random {1 - settings.alpha:.0%} of the examples weighted 0")
    resumes = " (computing resumes from there)." if done else "."
    st.info(f"LDS needs the ground truth: {total} {models}. {done} of {total} exist" + resumes)
    capability = capabilities(run)["retrain" if settings.mode == "reshuffled" else "order_keeping"]
    if not capability.supported:  # said before the click: a button that can only fail is not offered as one that works
        st.warning(f"This run cannot {capability.label}: {capability.reason}", icon=":material/block:")
    pressed = st.button(f"Compute the ground truth ({total - done} retrainings)", icon=":material/model_training:", key="lds_compute",
                        disabled=not capability.supported, help=capability.reason)
    return call_or_report(job_result, run, spec, submit=True) if pressed else None


def lds_scores(run: Run, methods: list[str], n_queries: int) -> dict[str, Scores]:
    """Each method's scores of the first n_queries test samples: stored ones, the others queued as jobs (their panels shown)."""
    computed = {method: call_or_report(first_queries_scores, run, method, tuple(default_checkpoints(run, method)), n_queries)
                for method in methods}
    return {method: scores_ for method, scores_ in computed.items() if scores_ is not None}


def render_lds(run: Run, computed: dict[str, Scores], query: int) -> None:
    """LDS of each method over the first test samples with its standard error, and the scatter of the chosen test sample.

    computed: each method's scores of the chosen sample (one row). The ground truth holds the retrained margins of every
    test sample, so the chosen one's scatter is drawn from its own scores wherever it is in the test set.
    """
    methods = list(computed)
    st.subheader("Linear datamodeling score")
    st.caption("How well a method's scores predict retraining: per test sample, the Spearman correlation over the subsets of "
               "the summed scores of the examples each subset keeps against the margin the model trained on it measures.")
    settings = lds_settings_controls(run)
    if settings is None:
        return
    truth = render_groundtruth(run, settings)
    if truth is None:
        return
    _, test_set = run.datasets()
    n_queries = min(LDS_QUERIES, len(test_set))
    if n_queries < len(test_set):
        st.caption(f"Over the first {n_queries} of the {len(test_set):,} test samples. The whole test set is a job for the "
                   f"command line: `tdx lds {run.run_id} --methods {','.join(methods)} --subsets {settings.n_subsets} "
                   f"--alpha {settings.alpha:g} --mode {settings.mode}`.")
    first_queries = lds_scores(run, methods, n_queries)
    results = {method: call_or_report(lds, method_result, truth) for method, method_result in first_queries.items()}
    results = {method: result for method, result in results.items() if result is not None}
    if not results:
        return
    labels = [method_label(method) for method in results]
    question = mode_question(settings)
    left, right = st.columns(2, gap="large")
    with left:
        over = f"the first {n_queries} test samples" if n_queries < len(test_set) else "the test set"
        st.markdown(f"**Mean over {over}** ({describe(settings)})")
        st.caption(question)
        st.plotly_chart(charts.lds_bars(labels, [r.mean for r in results.values()], [r.stderr for r in results.values()]), key="lds_bars")
    series, rows = {}, []
    for method, result in results.items():
        chosen = call_or_report(lds, computed[method], truth)  # one row: the chosen sample's own scores
        row = {"method": method_label(method), "LDS": result.mean, "± s.e.": result.stderr, "queries": result.n_valid}
        if chosen is not None:
            series[f"{method_label(method)} (ρ = {chosen.per_query[0]:.2f})"] = (chosen.predicted[0], chosen.actual[0])
            row[f"test {query}"] = chosen.per_query[0]
        rows.append(row)
    with right:
        st.markdown(f"**Test {query}: predicted effect against the retrained margin**")
        st.caption(question if query < n_queries else
                   f"{question} Test {query} is not among the first {n_queries} test samples of the mean; the retrained "
                   "models' margins cover every test sample, so its own scores are drawn against them here.")
        st.plotly_chart(charts.lds_scatter(series), key="lds_scatter")
    st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
        column: st.column_config.NumberColumn(format="%.3f") for column in ("LDS", "± s.e.", f"test {query}")})


def methods_help(run: Run) -> str:
    """The method selector's help: the checkpoints used, and why the methods not offered are missing."""
    unsupported = unsupported_methods(run)
    missing = f" Not offered for this run: {'; '.join(unsupported.values())}." if unsupported else ""
    return "Each method at its default checkpoints." + missing


def large_run_note(run: Run) -> str:
    """What Compare opens with on a large run, and what the other methods cost there."""
    train_set, _ = run.datasets()
    quick = quick_method(run)
    return (f":material/speed: A large run ({len(train_set):,} training examples): Compare opens with "
            + (f"{method_label(quick)} (one forward pass) beside the default method, whose fit runs in the background. " if quick else "")
            + "Fits and methods that pass over the whole training set for every block of test samples (exact TracIn, "
            "unprojected influence, replay) run in the background lane when you add them.")


def render() -> None:
    """The Compare page."""
    page = page_prelude("Compare")
    run, test_set, predictions = page.run, page.test_set, page.predictions
    choices = method_choices(run)
    controls = st.columns([1.5, 2, 1])
    query = query_selectbox(test_set, predictions, controls[0])
    methods = controls[1].multiselect(
        "Methods (two to four)", choices, default=compared_methods(run), max_selections=4, format_func=method_label,
        key="compare_methods", help=methods_help(run))
    k = controls[2].slider("Top k", 5, 15, 10, key="compare_k")
    with st.columns([1, 2])[0]:
        query_card(test_set, predictions, query, size=120)
    if large_run(run):
        st.caption(large_run_note(run))
    if len(methods) < 2:
        st.info("Choose at least two methods to compare.")
        return
    computed = method_scores(run, methods, query)
    render_method_rows(run, computed, k)
    st.subheader("Agreement")
    render_agreement(computed, k)
    render_lds(run, computed, query)

render()
