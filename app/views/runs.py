"""Runs: the workspace's trained runs, the chosen run's recipe and training timeline, and a form to train a new one."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app.components import charts
from app.components.context import current_run_id, select_run
from app.components.core_calls import call_or_report, list_runs_cached, load_run_cached, workspace
from app.components.jobs import job_result
from app.components.methods import checkpoint_label
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError
from attribution_core.jobs.kinds import train_job
from attribution_core.jobs.queue import JobSpec
from attribution_core.models import ModelSpec
from attribution_core.runs.record import schedule_summary
from attribution_core.runs.recorder import ORIGIN_RECORDED
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage

DATA_SOURCES = {"sample": "Fashion-MNIST sample (shipped)", "digits": "scikit-learn digits (8×8)"}
"""Data the training form offers: both ship with the project, nothing is downloaded."""

TRAINING_KEY = "training_jobs"
"""Session state: the training jobs started from the form in this session (their panels and Open buttons)."""


def stages_text(run: Run) -> str:
    """'pretrain (4 ep) → finetune (4 ep, classes 0–4)'."""
    parts = []
    for stage in run.recipe.stages:
        extra = f", classes {','.join(map(str, stage.classes))}" if stage.classes is not None else ""
        parts.append(f"{stage.name} ({stage.epochs} ep{extra})")
    return " → ".join(parts)


def data_text(run: Run) -> str:
    """'sample, 10 % of labels flipped' from the run's data spec."""
    noise = run.data.noise_fraction
    return run.data.source + (f", {noise:.0%} of labels flipped (seed {run.data.noise_seed})" if noise else "")


def runs_table(runs: list[Run], current: str | None) -> pd.DataFrame:
    """One row per run: what it was trained on, how, and how well."""
    return pd.DataFrame([{
        "open": "●" if run.run_id == current else "",
        "run": run.run_id,
        "data": data_text(run),
        "train / test": f"{run.metrics.get('n_train', '?')} / {run.metrics.get('n_test', '?')}",
        "model": run.model.name,
        "stages": stages_text(run),
        "test accuracy": run.metrics.get("test_accuracy"),
        "checkpoints": len(run.checkpoints),
        "created": run.created,
    } for run in runs])


def render_overview(runs: list[Run]) -> None:
    """The runs table; choosing a row makes that run current on every page."""
    table = runs_table(runs, current_run_id())

    def choose_row() -> None:
        rows = st.session_state["runs_table"].selection.rows
        if rows:
            select_run(table["run"].iloc[rows[0]])

    st.dataframe(
        table, hide_index=True, key="runs_table", on_select=choose_row, selection_mode="single-row",
        column_config={"test accuracy": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)},
    )
    st.caption("Choose a row (or the sidebar's Run) to open that run on every page.")


def render_details(run: Run) -> None:
    """The current run: metrics, recipe stages, and its learning-rate timeline with the checkpoints."""
    st.subheader(f"Run {run.run_id}")
    metrics = run.metrics
    columns = st.columns(5)
    columns[0].metric("Test accuracy", f"{metrics.get('test_accuracy', float('nan')):.1%}")
    columns[1].metric("Train accuracy", f"{metrics.get('train_accuracy', float('nan')):.1%}")
    columns[2].metric("Training examples", f"{metrics.get('n_train', '?')}")
    columns[3].metric("Parameters", f"{metrics.get('n_parameters', 0):,}")
    columns[4].metric("Checkpoints", f"{len(run.checkpoints)}")
    st.markdown(f"**Data** {data_text(run)} · {run.metrics.get('n_train', '?')} training, "
                f"{run.metrics.get('n_test', '?')} test examples · **Model** {run.model.name} {run.model.options} · "
                f"seed {run.recipe.seed} · trained in {run.metrics.get('train_seconds', float('nan')):.0f} s")
    if run.record is not None and run.metrics.get("origin") == ORIGIN_RECORDED:
        st.dataframe(recorded_stages(run), hide_index=True)
        st.caption("Read from the training record: what every optimizer step of your loop ran with.")
    else:
        st.dataframe(pd.DataFrame([{
            "stage": stage.name, "epochs": stage.epochs, "optimizer": stage.optimizer, "lr": stage.lr,
            "schedule": stage.schedule, "batch": stage.batch_size,
            "classes": "all" if stage.classes is None else ",".join(map(str, stage.classes)), "transform": stage.transform,
        } for stage in run.recipe.stages]), hide_index=True)
    st.caption(record_text(run))
    left, right = st.columns([1, 1.6], gap="large")
    left.dataframe(pd.DataFrame([{
        "checkpoint": checkpoint_label(run, info.index), "epoch": info.epoch, "test accuracy": info.test_accuracy,
    } for info in run.checkpoints]), hide_index=True, column_config={
        "test accuracy": st.column_config.NumberColumn(format="percent")})
    with right:
        st.plotly_chart(charts.training_timeline(run), key="timeline")


OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "other": "an optimizer the record does not name"}
DECAY_WORDS = {"linear": "linear decay", "cosine": "cosine decay", "step": "stepped down", "other": "down"}
"""How the Runs page names record.schedule_summary's decay shapes (after "then", before "to <final lr>")."""


def recorded_stages(run: Run) -> pd.DataFrame:
    """One row per stage of a run recorded from a user's loop, described from its record (its recipe only describes it)."""
    rows = []
    for number, stage in enumerate(run.recipe.stages):
        steps = np.flatnonzero(run.record.stage == number) + 1  # a recorded stage is one stretch of steps
        if len(steps):
            summary = schedule_summary(run.record, int(steps[0]), int(steps[-1]))
            rows.append({"stage": stage.name, "steps": summary["steps"], "epochs": stage.epochs,
                         "optimizer": optimizer_text(summary), "learning rate": schedule_text(summary), "batch": stage.batch_size})
    return pd.DataFrame(rows)


def optimizer_text(summary: dict) -> str:
    """'SGD (momentum 0.9, weight decay 0.0005)' or 'Adam (β1 0.9, β2 0.999, weight decay 0)' from a schedule summary."""
    name = summary["optimizer"]
    if name == "sgd":
        settings = [f"momentum {summary['momentum']:g}" if summary["momentum"] else "no momentum"]
    elif name in ("adam", "adamw"):
        settings = [f"β1 {summary['momentum']:g}", f"β2 {summary['beta2']:g}"]
    else:
        settings = []
    settings.append(f"weight decay {summary['weight_decay']:g}")
    return f"{OPTIMIZER_NAMES[name]} ({', '.join(settings)})"


def schedule_text(summary: dict) -> str:
    """The learning rate's course in words: 'warm-up over 4 steps from 0.02 to a peak of 0.1, then cosine decay to 0.0002 over 39 steps'."""
    peak, decay = f"{summary['peak_lr']:.3g}", summary["decay"]
    if summary["warmup_steps"]:
        parts = [f"warm-up over {summary['warmup_steps']} steps from {summary['first_lr']:.3g} to a peak of {peak}"]
    else:
        parts = [f"constant {peak}" if decay == "none" else f"peak {peak}"]
    if decay == "none":
        return ", ".join(parts + (["then constant"] if summary["warmup_steps"] else []))
    if summary["hold_steps"] > 1:
        parts.append(f"held for {summary['hold_steps']} steps")
    parts.append(f"then {DECAY_WORDS[decay]} to {summary['final_lr']:.3g} over {summary['decay_steps']} steps")
    return ", ".join(parts)


def record_text(run: Run) -> str:
    """What the attribution of this run rests on: its per-step record, or the recipe when it has none."""
    if run.record is None:
        return ("No per-step training record (a run from before records existed, or imported): which examples each stretch "
                "of training drew is taken from the recipe's stage classes, so SOURCE's and TracIn's scores are approximate.")
    return (f"Training record: {run.record.n_steps:,} optimizer steps, every batch and each example's loss and margin there. "
            "Attribution takes each checkpoint's gradients on the images as its stage saw them (stage transforms applied "
            "exactly) and weighs each example by how often that stretch of training drew it; random augmentation in a "
            "training loop is attributed on the un-augmented image.")


def stage_from_form(prefix: str, values: dict, classes: list[int] | None) -> Stage:
    """A Stage from the form's fields for one stage."""
    return Stage(name=values[f"{prefix}_name"], epochs=values[f"{prefix}_epochs"], lr=values[f"{prefix}_lr"],
                 optimizer=values[f"{prefix}_optimizer"], schedule=values[f"{prefix}_schedule"],
                 classes=tuple(classes) if classes else None)


def training_job(values: dict) -> JobSpec:
    """The job that trains the run the form describes (refused when the name is taken)."""
    run_id = values["run_id"].strip()
    if run_id in workspace().run_ids():
        raise SettingsError(f"run {run_id!r} already exists in this workspace: choose another name")
    data = DataSpec(source=values["source"], max_train=values["max_train"], max_test=values["max_test"],
                    noise_fraction=values["noise"], noise_seed=0)
    model = ModelSpec(values["model"], {"hidden": [values["hidden"]]} if values["model"] == "mlp" else {})
    stages = [stage_from_form("first", values, None)]
    if values["second_epochs"] > 0:
        stages.append(stage_from_form("second", values, values["second_classes"]))
    recipe = Recipe(tuple(stages), seed=values["seed"], checkpoints=CheckpointPolicy(every_epochs=None, count=values["checkpoints"]))
    return train_job(workspace(), run_id, data, model, recipe)


def render_training_jobs() -> None:
    """Runs being trained in the background (started from the form), each with its progress panel or an Open button."""
    for spec in st.session_state.get(TRAINING_KEY, []):
        run = call_or_report(job_result, workspace(), spec)
        if run is not None:
            st.success(f"Trained {run.run_id}: test accuracy {run.metrics['test_accuracy']:.1%}", icon=":material/check_circle:")
            st.button(f"Open {run.run_id}", on_click=select_run, args=(run.run_id,), type="primary", icon=":material/open_in_new:",
                      key=f"open_trained_{run.run_id}")


def render_training_form() -> None:
    """A form to train a new run on the shipped data; the trained run can then be opened."""
    st.subheader("Train a new run")
    with st.form("train_form"):
        values: dict = {}
        top = st.columns(4)
        values["run_id"] = top[0].text_input("Run name", value="my-run", max_chars=64, key="run_name",
                                             help="letters, digits, '.', '_' and '-'")
        values["source"] = top[1].selectbox("Data", list(DATA_SOURCES), format_func=DATA_SOURCES.get)
        values["max_train"] = top[2].number_input("Training examples (max)", 50, 60000, 1000, step=50, key="max_train")
        values["max_test"] = top[3].number_input("Test examples (max)", 20, 10000, 200, step=20, key="max_test")
        middle = st.columns(4)
        values["noise"] = middle[0].slider("Labels flipped on purpose", 0.0, 0.3, 0.0, 0.01, format="%.2f")
        values["model"] = middle[1].selectbox("Model", ["mlp", "cnn"])
        values["hidden"] = middle[2].number_input("MLP hidden width", 8, 1024, 128, step=8)
        values["checkpoints"] = middle[3].number_input("Checkpoints to keep", 1, 50, 6)
        for prefix, title, epochs in (("first", "Stage 1", 4), ("second", "Stage 2 (optional fine-tune; 0 epochs = none)", 0)):
            st.markdown(f"**{title}**")
            row = st.columns(5)
            values[f"{prefix}_name"] = row[0].text_input("Name", value="train" if prefix == "first" else "finetune", key=f"{prefix}_name")
            values[f"{prefix}_epochs"] = row[1].number_input("Epochs", 0 if prefix == "second" else 1, 200, epochs, key=f"{prefix}_epochs")
            values[f"{prefix}_lr"] = row[2].number_input("Learning rate", 1e-5, 1.0, 0.05, format="%.4f", key=f"{prefix}_lr")
            values[f"{prefix}_optimizer"] = row[3].selectbox("Optimizer", ["sgd", "adam"], key=f"{prefix}_optimizer")
            values[f"{prefix}_schedule"] = row[4].selectbox("Schedule", ["constant", "cosine", "linear", "step"], key=f"{prefix}_schedule")
        bottom = st.columns([3, 1])
        values["second_classes"] = bottom[0].multiselect("Stage 2 trains only on these classes (empty: all)", list(range(10)))
        values["seed"] = bottom[1].number_input("Seed", 0, 2**31 - 1, 0)
        submitted = st.form_submit_button("Train", type="primary", icon=":material/play_arrow:")
    if submitted:
        spec = call_or_report(training_job, values)
        if spec is not None:
            started = st.session_state.setdefault(TRAINING_KEY, [])
            started[:] = [earlier for earlier in started if earlier.key != spec.key] + [spec]
    render_training_jobs()


def render() -> None:
    """The Runs page."""
    st.title("Runs")
    runs = call_or_report(list_runs_cached)
    if runs:
        render_overview(runs)
        run_id = current_run_id()
        if run_id is not None:
            run = call_or_report(load_run_cached, run_id)
            if run is not None:
                render_details(run)
    elif runs is not None:
        st.info("This workspace has no runs yet. Train one below, or build the demo with `tdx demo`.")
    st.divider()
    render_training_form()


render()
