"""The rough edges a first-time user met (issue 29, item 5), each as the page now answers it; AppTest on the tiny demo."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from helpers_app import button_keys, image_captions, open_app, table_with, texts
from PIL import Image

from attribution_core.evaluation.lds import LdsSettings, load_groundtruth
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace

GROUND_TRUTH = LdsSettings(n_subsets=6)
pytestmark = pytest.mark.usefixtures("app_serves_workspace")  # jobs inline (tests/test_app_jobs.py covers workers)


@pytest.fixture(scope="module")
def workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace with LDS ground truth for fmnist-mlp."""
    return demo_copy("first_use", GROUND_TRUTH)


def figure(app, chart: int = 0) -> dict:
    """The plotly figure of a chart of the page, as the browser receives it."""
    return json.loads(app.get("plotly_chart")[chart].proto.spec)


def plotly_array(value) -> np.ndarray:
    """A figure's array, decoded from plotly's typed-array encoding ({"bdata", "dtype"}) when it uses it."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


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


# --- Compare ------------------------------------------------------------------------------------------------------


def test_compare_draws_the_lds_scatter_of_a_sample_outside_the_first_ones_from_its_own_scores(workspace, monkeypatch):
    from scipy.stats import spearmanr

    from attribution_core.api import default_checkpoints
    from attribution_core.api import stored_scores as stored
    from attribution_core.jobs.ready import query_block

    monkeypatch.setattr("attribution_core.jobs.ready.LDS_QUERIES", 20)  # the demo's 100 test samples are all covered by 100
    app = open_app("compare", query="57")
    assert app.selectbox(key="query").value == 57
    run = load_run(workspace, "fmnist-mlp")
    truth = load_groundtruth(run, GROUND_TRUTH)
    block = query_block(57, len(run.datasets()[1]))
    expected = {}
    for method, label in (("trak", "TRAK"), ("tracin", "TracIn")):
        values = stored(run, method, queries=block, checkpoints=default_checkpoints(run, method)).values[block.index(57)]
        expected[label] = spearmanr(truth.masks.astype(float) @ values, truth.margins[:, 57]).statistic
    table = table_with(app, "LDS")
    assert dict(zip(table["method"], table["test 57"])) == pytest.approx(expected)
    scatter = figure(app, 1)
    assert [trace["name"] for trace in scatter["data"]] == [f"{label} (ρ = {rho:.2f})" for label, rho in expected.items()]
    for trace, label in zip(scatter["data"], expected):
        np.testing.assert_allclose(plotly_array(trace["y"]), truth.margins[:, 57], err_msg=f"{label}: the retrained margins")
    text = texts(app)
    assert "Test 57 is not among the first 20 test samples of the mean" in text and "choose one of them" not in text
    assert "**Mean over the first 20 test samples**" in text


# --- Runs -----------------------------------------------------------------------------------------------------------


def test_runs_page_describes_a_recorded_loop_from_its_record(tmp_path, monkeypatch):
    import math

    import torch
    from torch.nn import functional as F

    from attribution_core.data import DataSpec
    from attribution_core.models import ModelSpec, build_model
    from attribution_core.runs.recorder import Recorder

    def warm_then_cosine(step: int) -> float:
        """The lr factor of step 0, 1, ...: up over 4 steps to 1, then a half cosine down to 0 at step 19."""
        return (step + 1) / 4 if step < 4 else (1 + math.cos(math.pi * (step - 3) / 16)) / 2

    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", {"hidden": [8]}), (1, 8, 8), 10)
    with Recorder(tmp_path, "own-loop", model=model, factory="mlp", options={"hidden": [8]},
                  data=DataSpec(source="digits", test_size=30, max_train=64)) as recorder:
        x, y = recorder.train_set.x, recorder.train_set.y
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warm_then_cosine)
        for _ in range(5):
            for batch in torch.randperm(len(x)).split(16):
                losses = F.cross_entropy(model(x[batch]), y[batch], reduction="none")
                optimizer.zero_grad()
                losses.mean().backward()
                optimizer.step()
                recorder.step(optimizer, batch, losses=losses)
                scheduler.step()
            recorder.checkpoint()
    monkeypatch.setenv("TDX_WORKSPACE", str(tmp_path))
    app = open_app("runs", run="own-loop")
    stages = table_with(app, "learning rate")
    assert stages.to_dict("records") == [{
        "stage": recorder.run.recipe.stages[0].name, "steps": 20, "epochs": 5, "optimizer": "SGD (momentum 0.9, weight decay 0.0005)",
        "learning rate": "warm-up over 3 steps from 0.025 to a peak of 0.1, then cosine decay to 0 over 16 steps", "batch": 16}]
    assert "Read from the training record" in texts(app)


# --- Explore: an uploaded image -----------------------------------------------------------------------------------


def png(array: np.ndarray) -> bytes:
    """A PNG file of a uint8 image array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_upload_shows_what_the_model_sees_what_was_done_to_it_and_whether_it_is_like_the_training_images(workspace):
    from attribution_core.data import image_to_input, pixel_statistics

    train_set, test_set = load_run(workspace, "fmnist-mlp").datasets()
    low, high = np.quantile(pixel_statistics(train_set.x), [0.001, 0.999], axis=0)  # the page's range: 99.8 % of the images
    strip = np.random.default_rng(3).integers(0, 256, (60, 900, 3), dtype=np.uint8)
    app = open_app()
    app.file_uploader(key="upload").upload("strip.png", png(strip), "image/png").run()
    assert not app.error
    captions = image_captions(app)
    assert "Yours: strip.png" in captions and "What the model sees" in captions
    text = texts(app)
    assert ":material/info: Converted to grayscale: the model was trained on grayscale images." in text
    assert ":material/info: Resized from 900×60 to 28×28 pixels, its width-to-height ratio changed from 15 to 1." in text
    spread = pixel_statistics(image_to_input(Image.fromarray(strip), train_set))[0, 1]
    (warning,) = [warning.value for warning in app.warning if warning.value.startswith("Unlike the training images")]
    assert (f"pixel standard deviation (contrast) {spread:.3g} is outside the range {low[1]:.3g} to {high[1]:.3g} "
            "of 99.8% of them") in warning
    assert len(button_keys(app, "upload_results_proponents_")) == 10, "still explained, with the warning beside it"

    statistics = pixel_statistics(test_set.x)
    typical = int(np.flatnonzero(((low <= statistics) & (statistics <= high)).all(axis=1))[0])
    app.file_uploader(key="upload").clear().upload("test.png", png(test_set.images[typical]), "image/png").run()
    text = texts(app)
    assert "Converted to grayscale" not in text and "Resized" not in text
    assert not [warning for warning in app.warning if warning.value.startswith("Unlike the training images")]
