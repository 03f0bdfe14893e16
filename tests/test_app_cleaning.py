"""The Mislabels page's cleaning section, run headless with AppTest on a copy of the tiny demo (jobs inline, in the page)."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers_app import MAIN, TIMEOUT, table_with, texts
from streamlit.testing.v1 import AppTest
from torch.nn import functional as F

from attribution_core.annotations import Annotations
from attribution_core.cleaning.experiment import cleaned_run_id
from attribution_core.cleaning.plan import load_source, make_plan
from attribution_core.runs.recorder import Recorder
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace

RUN = "fmnist-noisy"


@pytest.fixture(scope="module")
def workspace(demo_workspace, tmp_path_factory) -> Workspace:
    """A private copy of the tiny demo with three flags on fmnist-noisy, and a run recorded by the Recorder (not retrainable)."""
    root = tmp_path_factory.mktemp("app_cleaning") / "workspace"
    shutil.copytree(demo_workspace.root, root)
    workspace = Workspace(root)
    run = load_run(workspace, RUN)
    train_set, _ = run.datasets()
    ids, given = train_set.ids.tolist(), train_set.y.tolist()
    store = Annotations(workspace.annotations_path)
    store.set_flag(RUN, ids[0], "mislabeled", suggested_label=(given[0] + 1) % 10)
    store.set_flag(RUN, ids[1], "outlier")
    store.set_flag(RUN, ids[2], "ambiguous")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with Recorder(workspace, "plain-loop", model=model, factory="mlp", options={"hidden": [16]}, data=run.data) as recorder:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in torch.arange(recorder.n_train).split(64):
            losses = F.cross_entropy(model(recorder.train_set.x[batch]), recorder.train_set.y[batch], reduction="none")
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            recorder.step(optimizer, batch, losses=losses)
    store.set_flag("plain-loop", ids[0], "outlier")
    return workspace


@pytest.fixture(autouse=True)
def workspace_env(workspace, monkeypatch):
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


def open_mislabels(run_id: str) -> AppTest:
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    app.query_params.update({"run": run_id})
    app.run()
    app.switch_page("views/mislabels.py").run()
    assert not app.exception, [exception.message for exception in app.exception]
    return app


def plan_editor(app: AppTest):
    return next(editor for editor in app.data_editor if editor.key and editor.key.startswith(f"cleaning_table_{RUN}"))


def test_the_flags_make_the_plan_its_effect_is_predicted_and_one_click_retrains_beside_a_control(workspace):
    app = open_mislabels(RUN)
    run = load_run(workspace, RUN)
    plan = make_plan(run, load_source(run), Annotations(workspace.annotations_path).flags(RUN))
    table = plan_editor(app).value
    assert table["action"].tolist() == ["relabel", "remove", "keep"]
    assert table["new class"].tolist()[0] == run.datasets()[0].class_names[plan.entries[0].label]
    assert f"**Plan {plan.key()[:8]}:** 1 relabelled, 1 removed, 1 kept." in texts(app)
    assert [metric.label for metric in app.metric][:3] == ["Test accuracy now", "Predicted after (EK-FAC influence)", "Predicted to flip"]
    retrain = app.button(key="cleaning_retrain")
    assert not retrain.disabled
    retrain.click().run()
    assert not app.exception, [exception.message for exception in app.exception]
    assert "Retrained on 3 seeds." in texts(app) and "Spearman" in texts(app)
    assert table_with(app, "retrained with the plan").columns.tolist() == [
        "class", "test samples", "now", "predicted", "retrained as it was", "retrained with the plan", "control"]
    app.button(key="cleaning_open_run").click().run()
    assert app.selectbox(key="run").value == cleaned_run_id(run, plan) and not app.exception


def test_a_run_that_cannot_be_retrained_says_so_before_any_click():
    app = open_mislabels("plain-loop")
    assert app.button(key="cleaning_retrain").disabled
    assert any("This run cannot be retrained" in warning.value and "cannot call again" in warning.value for warning in app.warning)
