"""The Mislabels page's cleaning section: the plan made from the flags, its predicted effect, the retrain, before and after.

The plan (attribution_core.cleaning.plan) comes from the run's flags and, if asked, the current
ranking's top k; its table edits one example's action or new class at a time, kept as the run's
plan source in the workspace. The predicted effect is read from the store, or computed by a job
(the method's scores of the whole test set, and its fit with the plan's labels); "Retrain" queues
the experiment (the run retrained with the plan and with a random control, over seeds). Nothing
here computes: every number comes from the core.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from attribution_core.cleaning.experiment import ExperimentResult, ExperimentSettings, compare
from attribution_core.cleaning.export import image_folder_files, npz_bytes
from attribution_core.cleaning.plan import (
    ACTIONS,
    CleaningPlan,
    PlanEntry,
    PlanSource,
    check_plan,
    load_source,
    make_plan,
    plan_csv,
    save_source,
    store_plan,
)
from attribution_core.cleaning.predict import DEFAULT_METHOD, PredictedEffect, predicting_methods
from attribution_core.errors import PlanError
from attribution_core.jobs.kinds import cleaning_experiment_job, cleaning_prediction_job
from attribution_core.jobs.queue import ACTIVE, JobSpec
from attribution_core.jobs.ready import offered_methods
from attribution_core.runs.capabilities import capabilities
from attribution_core.runs.run import Run

from .context import select_run
from .core_calls import annotations, call_or_report, method_label
from .examples import class_name
from .jobs import job_queue, job_result
from .rankings import mislabel_ranking

METHOD_KEY, TOP_K_KEY, FLAGS_KEY, RETRAIN_KEY = "cleaning_method", "cleaning_top_k", "cleaning_flags", "cleaning_retrain"
PREDICTION_JOB_KEY = "cleaning_prediction_job"
"""Session state: the key of the prediction job this tab asked for last."""
ERROR_KEY = "cleaning_edit_error"
"""Session state: why the last edit of the plan was refused (shown once above the table)."""
SIZE_CAVEAT = ("The predicted changes order the test samples well (benchmark B9: Spearman 0.86 against retraining on the demo's "
               "noisy run with EK-FAC), but EK-FAC and SOURCE overstate their size, TRAK less: the predicted accuracy and flips "
               "say which way, the retrain says how far.")
"""What the predicted accuracy can be trusted for, as measured (benchmarks/RESULTS.md, B9)."""
COLUMN_WIDTHS = {"example": 90, "given class": 140, "action": 110, "new class": 140, "why": 260}
"""The plan table's column widths in pixels, the table as wide as they are: a cell is found at the same place whatever the
classes' names and the window (the browser test clicks into it)."""
EXPERIMENT = ExperimentSettings()
"""The retrain the button queues: three seeds, a random control of the plan's size, the cleaned data kept as a run."""


def table_key(run: Run, plan: CleaningPlan) -> str:
    """Session-state key of the plan's table: the run's, with the plan's key (an edit makes a new plan, drawn in a fresh table)."""
    return f"cleaning_table_{run.run_id}_{plan.key()}"


def current_plan(run: Run, source: PlanSource) -> CleaningPlan | None:
    """The plan the run's source makes now (its flags as they are), or None while the ranking it takes its top k from is computed."""
    ranking = mislabel_ranking(run, source.ranking) if source.top_k else None
    if source.top_k and ranking is None:
        return None
    return call_or_report(make_plan, run, source, annotations().flags(run.run_id), ranking)


def save_edits(run: Run, source: PlanSource, key: str, plan: CleaningPlan) -> None:
    """The plan table's edits kept in the run's plan source, checked first (a callback); a refused edit says why and keeps nothing."""
    names = list(run.datasets()[0].class_names)
    entries, edited = list(plan.entries), source
    for row, change in st.session_state[key]["edited_rows"].items():
        current = entries[int(row)]
        action = change.get("action", "relabel" if change.get("new class") else current.action)
        label = (names.index(change["new class"]) if change.get("new class") else current.label) if action == "relabel" else None
        entries[int(row)] = PlanEntry(current.example_id, action, label, "edited")
        edited = edited.edited(current.example_id, action, label)
    try:
        check_plan(run, CleaningPlan(run.run_id, tuple(entries)), allow_no_change=True)
    except PlanError as exc:
        st.session_state[ERROR_KEY] = str(exc)
        return
    save_source(run, edited)


def set_source(run: Run, source: PlanSource, ranking: str) -> None:
    """Keep the flags switch and top k chosen above the table in the run's plan source (a callback)."""
    top_k = int(st.session_state[TOP_K_KEY])
    save_source(run, PlanSource(bool(st.session_state[FLAGS_KEY]), ranking if top_k else None, top_k, source.edits))


def drop_edits(run: Run, source: PlanSource) -> None:
    """Back to the defaults of every example (a callback)."""
    save_source(run, PlanSource(source.flags, source.ranking, source.top_k))


def render_source(run: Run, source: PlanSource, ranking: str) -> None:
    """The plan's sources: the flags (on or off) and the current ranking's top k; the edits' count with a reset."""
    columns = st.columns([1.2, 1.2, 1], vertical_alignment="bottom")
    columns[0].toggle("The flagged examples", value=source.flags, key=FLAGS_KEY, on_change=set_source, args=(run, source, ranking),
                      help="Mislabeled: relabel to its suggested class (remove without one); outlier: remove; ambiguous: keep")
    columns[1].number_input("and this ranking's top k", min_value=0, max_value=len(run.datasets()[0]), value=source.top_k, step=10,
                            key=TOP_K_KEY, on_change=set_source, args=(run, source, ranking),
                            help="Also the ranking's most suspicious examples: relabelled to its suggestion, removed without one")
    edits = len(source.edits)
    label = f"Undo {edits} edit{'s' if edits != 1 else ''}" if edits else "Undo edits"
    columns[2].button(label, key="cleaning_drop_edits", icon=":material/restart_alt:", disabled=not edits, on_click=drop_edits,
                      args=(run, source), help="Every example back to its default action")


def plan_table(run: Run, plan: CleaningPlan) -> pd.DataFrame:
    """One row per planned example: id, given class, action, new class, why it is in the plan."""
    train_set, _ = run.datasets()
    index_of = {int(example_id): index for index, example_id in enumerate(train_set.ids.tolist())}
    return pd.DataFrame({
        "example": [entry.example_id for entry in plan.entries],
        "given class": [class_name(train_set, int(train_set.y[index_of[entry.example_id]])) for entry in plan.entries],
        "action": [entry.action for entry in plan.entries],
        "new class": [None if entry.label is None else train_set.class_names[entry.label] for entry in plan.entries],
        "why": [entry.origin for entry in plan.entries],
    })


def render_plan_table(run: Run, source: PlanSource, plan: CleaningPlan) -> None:
    """The plan as an editable table: each row's action and new class."""
    train_set, _ = run.datasets()
    refused = st.session_state.pop(ERROR_KEY, None)
    if refused:
        st.error(f"That edit was not kept: {refused}", icon=":material/error:")
    key = table_key(run, plan)
    st.data_editor(
        plan_table(run, plan), key=key, hide_index=True, width="content", height=min(400, 38 + 35 * max(1, len(plan.entries))),
        disabled=["example", "given class", "why"], num_rows="fixed",
        column_config={"example": st.column_config.NumberColumn(width=COLUMN_WIDTHS["example"], format="%d"),
                       "given class": st.column_config.TextColumn(width=COLUMN_WIDTHS["given class"]),
                       "action": st.column_config.SelectboxColumn(options=list(ACTIONS), required=True, width=COLUMN_WIDTHS["action"]),
                       "new class": st.column_config.SelectboxColumn(options=list(train_set.class_names), width=COLUMN_WIDTHS["new class"]),
                       "why": st.column_config.TextColumn(width=COLUMN_WIDTHS["why"])},
        on_change=save_edits, args=(run, source, key, plan))


def cancel_stale_prediction(spec: JobSpec) -> None:
    """Cancel the prediction job this tab asked for last when the plan changed since: flagging one example after another would
    otherwise queue a prediction of every plan on the way (the new one would wait behind them)."""
    previous = st.session_state.get(PREDICTION_JOB_KEY)
    if previous not in (None, spec.key) and (job := job_queue().get(previous)) is not None and job.state in ACTIVE:
        job_queue().cancel(previous)
    st.session_state[PREDICTION_JOB_KEY] = spec.key


def render_prediction(run: Run, plan: CleaningPlan, key: str, method: str) -> PredictedEffect | None:
    """The predicted effect: accuracy now and after, per class, and the test samples predicted to flip (or the job's panel)."""
    spec = cleaning_prediction_job(run, key, method)
    cancel_stale_prediction(spec)
    predicted = call_or_report(job_result, run, spec)
    if predicted is None:
        return None
    before, after = predicted.accuracy()
    columns = st.columns(3)
    columns[0].metric("Test accuracy now", f"{before:.1%}")
    columns[1].metric(f"Predicted after ({method_label(method)})", f"{after:.1%}", f"{after - before:+.1%}")
    columns[2].metric("Predicted to flip", f"{len(predicted.to_right)} right, {len(predicted.to_wrong)} wrong")
    st.caption(SIZE_CAVEAT)
    _, test_set = run.datasets()
    flips = np.concatenate([predicted.to_right, predicted.to_wrong])
    if len(flips):
        with st.expander(f"The {len(flips)} test samples predicted to flip"):
            st.dataframe(pd.DataFrame({
                "test sample": flips, "class": [class_name(test_set, int(test_set.y[i])) for i in flips],
                "predicted now": [class_name(test_set, int(predicted.predicted[i])) for i in flips],
                "becomes": ["right" if i in set(predicted.to_right.tolist()) else "wrong" for i in flips],
                "margin now": predicted.margins[flips], "predicted change": predicted.change[flips]}),
                hide_index=True, key="cleaning_flips")
    return predicted


def render_retrain(run: Run, key: str) -> ExperimentResult | None:
    """The retrain button (disabled, with the reason, for a run tdx cannot train again), then the job's panel or its result."""
    retrain = capabilities(run)["retrain"]
    if not retrain.supported:
        st.button("Retrain with this plan", key=RETRAIN_KEY, icon=":material/replay:", disabled=True)
        st.warning(f"This run cannot be retrained: {retrain.reason}", icon=":material/block:")
        return None
    pressed = st.button("Retrain with this plan", key=RETRAIN_KEY, icon=":material/replay:", type="primary",
                        help=f"Retrain the run with the plan and with a random control of the same size, on {len(EXPERIMENT.seeds)} seeds, "
                             "in the background; the cleaned data becomes a new run")
    return call_or_report(job_result, run, cleaning_experiment_job(run, key, EXPERIMENT), submit=pressed)


def class_table(run: Run, predicted: PredictedEffect, actual: ExperimentResult) -> pd.DataFrame:
    """Per class: test samples, accuracy now and predicted after the plan, and after retraining as it was, with the plan,
    with the control."""
    _, test_set = run.datasets()
    now, after = predicted.class_accuracy()
    return pd.DataFrame({"class": list(test_set.class_names), "test samples": np.bincount(actual.labels, minlength=actual.n_classes),
                         "now": now, "predicted": after, "retrained as it was": actual.class_accuracy("base"),
                         "retrained with the plan": actual.class_accuracy("cleaned"), "control": actual.class_accuracy("control")})


def scatter(predicted: PredictedEffect, actual: ExperimentResult) -> go.Figure:
    """Each test sample's predicted margin change against the actual one (the seeds' mean)."""
    figure = go.Figure(go.Scatter(x=predicted.change, y=actual.margin_change("cleaned"), mode="markers",
                                    marker={"size": 5, "color": "#4C78A8", "opacity": 0.6},
                                    hovertemplate="predicted %{x:.2f}<br>actual %{y:.2f}<extra></extra>"))
    figure.update_layout(xaxis_title="predicted change of the margin", yaxis_title="actual change (mean over seeds)", height=360,
                         margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return figure


def render_comparison(run: Run, predicted: PredictedEffect, actual: ExperimentResult) -> None:
    """Before and after: accuracy over seeds, per class, predicted against actual margins and flips, and the cleaned run."""
    fared = compare(predicted, actual)
    base, cleaned, control = (actual.accuracy(kind) for kind in ("base", "cleaned", "control"))
    with st.container(border=True, key="cleaning_result"):
        st.markdown(f"**Retrained on {len(actual.seeds)} seeds.** Test accuracy {base.mean():.1%} as it was (± {base.std():.1%} over "
                    f"seeds), **{cleaned.mean():.1%} with the plan** ({fared.accuracy_change:+.1%}), {control.mean():.1%} with as many "
                    f"random changes ({fared.control_accuracy_change:+.1%}). Predicted: {fared.predicted_accuracy_change:+.1%}.")
        chart, text = st.columns([1.4, 1], gap="large")
        chart.plotly_chart(scatter(predicted, actual), key="cleaning_scatter")
        text.markdown(f"**Predicted against actual margin change:** Spearman {fared.spearman:.2f} "
                      f"over {len(actual.labels)} test samples.  \n"
                      f"**Flips:** {fared.predicted_flips} predicted, {fared.observed_flips} observed in most seeds, "
                      f"{fared.flips_both} both.")
        if actual.cleaned_run:
            text.markdown(f"**The cleaned data** is kept as run `{actual.cleaned_run}`: every page opens it.")
            text.button("Open the cleaned run", key="cleaning_open_run", icon=":material/open_in_new:", on_click=select_run,
                        args=(actual.cleaned_run,))
        st.dataframe(class_table(run, predicted, actual), hide_index=True, key="cleaning_classes",
                     column_config={name: st.column_config.NumberColumn(format="percent")
                                    for name in ("now", "predicted", "retrained as it was", "retrained with the plan", "control")})


def image_folder_zip(run: Run, plan: CleaningPlan) -> bytes:
    """The cleaned data as a .zip of one folder per class, with plan.csv."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in image_folder_files(run, plan).items():
            archive.writestr(f"{run.run_id}-cleaned/{path.as_posix()}", data)
        archive.writestr(f"{run.run_id}-cleaned/plan.csv", plan_csv(run, plan))
    return buffer.getvalue()


def render_downloads(run: Run, plan: CleaningPlan) -> None:
    """The plan as CSV and the cleaned data as .npz or an image folder (.zip), made when pressed."""
    columns = st.columns(3)
    columns[0].download_button("Plan (CSV)", plan_csv(run, plan), file_name=f"{run.run_id}-plan-{plan.key()[:8]}.csv", mime="text/csv",
                               icon=":material/download:", key="cleaning_plan_csv", on_click="ignore", width="stretch")
    columns[1].download_button("Cleaned data (.npz)", lambda: npz_bytes(run, plan), file_name=f"{run.run_id}-cleaned-{plan.key()[:8]}.npz",
                               mime="application/octet-stream", icon=":material/download:", key="cleaning_npz", on_click="ignore",
                               width="stretch", help="x, y, ids, class_names of the cleaned training set, and the run's test set as "
                                                     "x_test, y_test, ids_test: `tdx train --data npz --data-path FILE` reads it")
    columns[2].download_button("Cleaned data (image folders)", lambda: image_folder_zip(run, plan),
                               file_name=f"{run.run_id}-cleaned-{plan.key()[:8]}.zip", mime="application/zip",
                               icon=":material/download:", key="cleaning_folders", on_click="ignore", width="stretch",
                               help="One folder per class (the image_folder source reads it), plan.csv beside")


def render_cleaning(run: Run, ranking: str) -> None:
    """The cleaning section: plan, predicted effect, retrain, before and after, downloads."""
    st.subheader("From flags to a better model")
    st.caption("If you fix these labels, does the model get better, and on which test images? The plan relabels, removes or keeps "
               "each suspect; its effect on every test sample is predicted from the method's scores before anything is retrained.")
    source = load_source(run)
    render_source(run, source, ranking)
    plan = current_plan(run, source)
    if plan is None:
        return
    if plan.entries:
        render_plan_table(run, source, plan)
    if not any(entry.action != "keep" for entry in plan.entries):
        st.info("The plan changes nothing yet: flag suspects above (mislabeled, outlier), or take the ranking's top k.",
                icon=":material/playlist_remove:")
        return
    key = call_or_report(store_plan, run, plan)
    if key is None:
        return
    offered = [name for name in predicting_methods(bool(plan.with_action("relabel"))) if name in offered_methods(run)]
    method = st.selectbox("Predicted by", offered, index=offered.index(DEFAULT_METHOD) if DEFAULT_METHOD in offered else 0,
                          key=METHOD_KEY, format_func=method_label)
    st.markdown(f"**Plan {key[:8]}:** {plan.summary()}.")
    predicted = render_prediction(run, plan, key, method)
    actual = render_retrain(run, key)
    if predicted is not None and actual is not None:
        render_comparison(run, predicted, actual)
    render_downloads(run, plan)
