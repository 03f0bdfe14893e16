"""The rough edges a first-time user met (issue 29, item 5), each as the page now answers it; AppTest on the tiny demo."""
from __future__ import annotations

import json

import pytest
from test_app_pages import GROUND_TRUTH, button_keys, open_app, texts

from attribution_core.runs.run import load_run
from attribution_core.store import Workspace


@pytest.fixture(scope="module")
def workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace with LDS ground truth for fmnist-mlp."""
    return demo_copy("first_use", GROUND_TRUTH)


@pytest.fixture(autouse=True)
def workspace_env(workspace, monkeypatch):
    """The app reads its workspace from TDX_WORKSPACE; its jobs run inline, in the page."""
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


def figure(app, chart: int = 0) -> dict:
    """The plotly figure of a chart of the page, as the browser receives it."""
    return json.loads(app.get("plotly_chart")[chart].proto.spec)


# --- Explore: a note ------------------------------------------------------------------------------------------------


def test_a_note_toast_only_for_a_note_with_words(workspace):
    app = open_app(run="fmnist-noisy", method="trak")
    index = int(button_keys(app, "results_opponents_")[0].removeprefix("results_opponents_"))
    app.button(key=f"results_opponents_{index}").click().run()
    note = f"inspect_{index}_note"
    app.text_input(key=note).set_value("   ").run()
    assert not app.toast, "blanks are no note"
    app.text_input(key=note).set_value("a bag?").run()
    assert [toast.value for toast in app.toast] == [f"Note on #{index} kept: it is saved with the verdict you choose."]
    app.text_input(key=note).set_value("").run()
    assert not app.toast, "an emptied note keeps nothing"


# --- Map ------------------------------------------------------------------------------------------------------------


def test_map_draws_training_points_over_test_samples_shows_the_shapes_and_drags_a_box(workspace):
    app = open_app("map")
    spec = figure(app)
    traces = [(trace["name"], trace.get("customdata") or [], trace["marker"]["symbol"], trace.get("showlegend", True))
              for trace in spec["data"]]
    splits = [points[0][0] for _, points, _, _ in traces if points]
    n_test_traces = splits.count("test")
    assert n_test_traces and splits == ["test"] * n_test_traces + ["train"] * (len(splits) - n_test_traces), \
        "test samples first: the training points are drawn over them"
    legend = [(name, symbol) for name, points, symbol, shown in traces if shown]
    class_names = list(load_run(workspace, "fmnist-mlp").datasets()[0].class_names)
    assert legend == [(name, "circle") for name in class_names] + [("test samples", "diamond"), ("training examples", "circle")]
    assert spec["layout"]["dragmode"] == "select"
    assert "Dragging draws a box; for a lasso, choose it in the chart's toolbar" in texts(app)
    app.toggle(key="map_show_test").set_value(False).run()
    names = [trace["name"] for trace in figure(app)["data"] if trace.get("showlegend", True)]
    assert "test samples" not in names and "training examples" in names
