"""Each page of the app, run headless with Streamlit's AppTest on a copy of the tiny demo workspace."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from attribution_core.annotations import Annotations
from attribution_core.api import METHODS, default_checkpoints, self_influence
from attribution_core.evaluation.lds import LdsSettings
from attribution_core.run import load_run
from attribution_core.store import Workspace

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
TIMEOUT = 120
GROUND_TRUTH = LdsSettings(n_subsets=6)


@pytest.fixture(scope="module")
def workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace (these tests flag examples and delete a checkpoint), with LDS ground truth."""
    return demo_copy("app_pages", GROUND_TRUTH)


@pytest.fixture(autouse=True)
def workspace_env(workspace, monkeypatch):
    """The app reads its workspace from TDX_WORKSPACE; its jobs run inline, in the page (tests/test_app_jobs.py covers workers)."""
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


def open_app(page: str | None = None, **query_params: str) -> AppTest:
    """A fresh session of the app (like a new browser tab) on a page, with URL query parameters."""
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    app.query_params.update(query_params)
    app.run()
    if page is not None:
        app.switch_page(f"views/{page}.py").run()
    assert not app.exception, [exception.message for exception in app.exception]
    return app


def texts(app: AppTest) -> str:
    """Every markdown, caption, subheader and alert text of the page, joined."""
    parts = [element.value for kind in ("markdown", "caption", "subheader", "title", "info", "error", "warning", "success")
             for element in getattr(app, kind)]
    return "\n".join(str(part) for part in parts)


def table_with(app: AppTest, column: str):
    """The first dataframe on the page that has this column."""
    return next(frame.value for frame in app.dataframe if column in frame.value.columns)


def button_keys(app: AppTest, prefix: str) -> list[str]:
    """Keys of the page's buttons that start with prefix, in page order."""
    return [button.key for button in app.button if button.key and button.key.startswith(prefix)]


# --- Explore -----------------------------------------------------------------------------------------------------


def test_explore_opens_on_the_most_confident_misprediction_with_proponents_and_opponents():
    app = open_app()
    text = texts(app)
    assert "misprediction" in text
    assert "Proponents: training examples that raised the margin" in text and "Opponents" in text
    assert len(button_keys(app, "results_proponents_")) == 10 and len(button_keys(app, "results_opponents_")) == 10
    assert app.selectbox(key="method").value == "trak"
    assert not app.error


def test_explore_reopens_the_view_named_in_the_url():
    app = open_app(run="fmnist-two-stage", query="5", method="tracin")
    assert app.selectbox(key="run").value == "fmnist-two-stage"
    assert app.selectbox(key="query").value == 5
    assert app.selectbox(key="method").value == "tracin"
    assert button_keys(app, "results_proponents_")


def test_method_selector_offers_exactly_the_methods_that_can_attribute_the_run(workspace):
    run = load_run(workspace, "fmnist-mlp")
    reasons = {method.label: method.unsupported_reason(run) for method in METHODS.values()}
    selector = open_app().selectbox(key="method")
    assert selector.options == [label for label, reason in reasons.items() if reason is None]
    unsupported = [reason for reason in reasons.values() if reason is not None]
    assert unsupported, "the demo's MLP is too large for exact influence"
    assert all(reason in selector.help for reason in unsupported), "the help says why the others are missing"


def test_explore_inspector_shows_trak_self_influence_without_a_mislabel_ranking(workspace):
    app = open_app(run="fmnist-two-stage", method="trak")  # a run the Mislabels tests never rank
    first = button_keys(app, "results_proponents_")[0]
    index = int(first.removeprefix("results_proponents_"))
    app.button(key=first).click().run()
    run = load_run(workspace, "fmnist-two-stage")
    expected = self_influence(run, "trak", checkpoints=default_checkpoints(run, "trak"))[index]
    assert f"**Self-influence** {expected:.4g}" in texts(app)


def test_picking_a_test_sample_in_the_grid_makes_it_the_query():
    app = open_app()
    second = button_keys(app, "pick_")[1]
    app.button(key=second).click().run()
    assert app.selectbox(key="query").value == int(second.removeprefix("pick_"))


def test_mispredictions_filter_leaves_only_mispredictions_in_the_grid():
    app = open_app()
    app.toggle(key="filter_wrong").set_value(True).run()
    grid_captions = [caption.value for caption in app.caption if caption.value.startswith("#")]
    assert grid_captions and all("→" in caption for caption in grid_captions)


def test_flag_from_explore_is_saved_and_seen_by_a_new_session(workspace):
    app = open_app()
    first = button_keys(app, "results_proponents_")[0]
    index = int(first.removeprefix("results_proponents_"))
    app.button(key=first).click().run()
    assert f"Training example #{index}" in texts(app)
    app.button(key=f"inspect_{index}_outlier").click().run()
    assert not app.exception
    example_id = int(load_run(workspace, "fmnist-mlp").datasets()[0].ids[index])
    assert Annotations(workspace.annotations_path).flags("fmnist-mlp")[example_id].kind == "outlier"
    again = open_app()
    assert ":material/flag: outlier" in texts(again)


def test_source_scores_split_by_segment_and_restricted_to_chosen_segments():
    app = open_app(run="fmnist-two-stage", method="source")
    segments = app.select_slider(key="segments")
    assert segments.value == (0, 2)
    labels = segments.options
    assert any("pretrain" in label for label in labels) and any("finetune" in label for label in labels)
    assert app.get("plotly_chart"), "each segment's contribution"
    all_segments = [caption.value for caption in app.caption if caption.value.startswith("**")]
    segments.set_value((2, 2)).run()
    assert not app.exception and not app.error
    assert [caption.value for caption in app.caption if caption.value.startswith("**")] != all_segments
    assert "segment 3" in texts(app)


def test_counterfactual_check_reports_margin_against_random_removals():
    app = open_app(run="fmnist-mlp-early")
    app.segmented_control(key="counterfactual_k").set_value("1 %").run()
    app.button(key="counterfactual_run").click().run()
    text = texts(app)
    assert "Removing the top 6 proponents and retraining moved the margin from" in text
    assert "random examples moved it by" in text
    assert app.get("plotly_chart")


def test_uploaded_png_is_queried_and_a_non_image_is_refused(workspace):
    app = open_app()
    picture = Image.fromarray(load_run(workspace, "fmnist-mlp").datasets()[1].images[0])
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    app.file_uploader(key="upload").upload("boot.png", buffer.getvalue(), "image/png").run()
    assert not app.error
    assert len(button_keys(app, "upload_results_proponents_")) == 10
    app.file_uploader(key="upload").clear().upload("notes.png", b"this is not an image", "image/png").run()
    assert any("not a readable image" in error.value for error in app.error)
    assert button_keys(app, "results_proponents_"), "the rest of the page keeps working"


def test_oversized_upload_is_refused():
    app = open_app()
    app.file_uploader(key="upload").upload("huge.png", b"\x89PNG" + bytes(6 * 2**20), "image/png").run()
    assert any("images up to 5 MB are accepted" in error.value for error in app.error)


def test_missing_checkpoint_is_an_error_on_the_page_and_the_rest_keeps_working(workspace):
    checkpoint = workspace.run_dir("fmnist-noisy") / "checkpoints" / "ckpt_0002.safetensors"
    checkpoint.rename(checkpoint.with_suffix(".moved"))
    try:
        app = open_app(run="fmnist-noisy")
        assert any("missing checkpoint" in error.value for error in app.error)
        assert button_keys(app, "pick_"), "the test-sample grid still shows"
    finally:
        checkpoint.with_suffix(".moved").rename(checkpoint)


def test_unknown_run_in_the_url_falls_back_to_a_real_run(workspace):
    app = open_app(run="no-such-run")
    assert app.selectbox(key="run").value in workspace.run_ids()


def test_an_empty_workspace_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TDX_WORKSPACE", str(tmp_path))
    app = open_app()
    assert "no runs yet" in texts(app)
    app.switch_page("views/runs.py").run()
    assert not app.exception
    assert any(button.label == "Train" for button in app.button), "the training form is there"


# --- Mislabels ---------------------------------------------------------------------------------------------------


def verdict_button(app: AppTest, kind: str) -> str:
    """Key of the review card's button for one verdict kind."""
    return next(key for key in button_keys(app, "review_") if key.endswith(f"_{kind}"))


def test_mislabels_flags_advance_count_and_export(workspace):
    app = open_app("mislabels", run="fmnist-noisy")
    assert "Suspect 1 of 600" in texts(app)
    app.button(key=verdict_button(app, "mislabeled")).click().run()
    assert "Suspect 2 of 600" in texts(app)
    app.button(key=verdict_button(app, "fine")).click().run()
    assert "1 flagged of 2 reviewed" in texts(app)
    table = table_with(app, "kind")
    assert sorted(table["kind"]) == ["fine", "mislabeled"]
    class_names = load_run(workspace, "fmnist-noisy").datasets()[0].class_names
    csv_text = Annotations(workspace.annotations_path).export_csv("fmnist-noisy", class_names)
    assert len(csv_text.strip().splitlines()) == 3
    assert set(table["example_id"].astype(str)) == {line.split(",")[1] for line in csv_text.strip().splitlines()[1:]}
    again = open_app("mislabels", run="fmnist-noisy")
    assert "1 flagged of 2 reviewed" in texts(again), "flags survive a new session"


def test_mislabels_shows_recall_of_flipped_labels_on_the_noisy_run():
    app = open_app("mislabels", run="fmnist-noisy")
    assert "How well the rankings find the flipped labels" in texts(app)
    recall = table_with(app, "ranking")
    assert list(recall["ranking"]) == ["dynamics"]
    assert 0 <= recall["found in top 10 %"].iloc[0] <= 1 and 0 <= recall["ROC-AUC"].iloc[0] <= 1


def test_mislabels_on_a_clean_run_has_no_recall_section():
    app = open_app("mislabels", run="fmnist-mlp")
    assert "How well the rankings find the flipped labels" not in texts(app)


# --- Compare -----------------------------------------------------------------------------------------------------


def test_compare_states_agreement_and_lds_with_stored_ground_truth():
    app = open_app("compare")
    text = texts(app)
    assert "**TRAK** and **TracIn** agree on" in text and "of the top 10" in text
    assert app.number_input(key="lds_subsets").value == GROUND_TRUTH.n_subsets
    lds_table = table_with(app, "LDS")
    assert list(lds_table["method"]) == ["TRAK", "TracIn"]
    assert lds_table["LDS"].between(-1, 1).all()
    assert len(app.get("plotly_chart")) == 2  # LDS bars and the scatter


def test_compare_computes_missing_ground_truth_with_a_button():
    app = open_app("compare", run="fmnist-mlp-early")
    app.number_input(key="lds_subsets").set_value(3).run()
    assert "0 of 3 exist" in texts(app)
    app.button(key="lds_compute").click().run()
    assert not app.exception  # the first test samples' scores follow without a button
    assert list(table_with(app, "LDS")["method"]) == ["TRAK", "TracIn"]


# --- Runs --------------------------------------------------------------------------------------------------------


def test_runs_page_lists_runs_and_shows_the_current_run(workspace):
    app = open_app("runs", run="fmnist-two-stage")
    table = table_with(app, "run")
    assert {"fmnist-mlp", "fmnist-mlp-early", "fmnist-two-stage", "fmnist-noisy"} <= set(table["run"])
    assert "Run fmnist-two-stage" in texts(app)
    stages = table_with(app, "stage")
    assert list(stages["stage"]) == ["pretrain", "finetune"]
    assert app.get("plotly_chart"), "the learning-rate timeline"
    steps = load_run(workspace, "fmnist-two-stage").record.n_steps
    assert f"Training record: {steps:,} optimizer steps" in texts(app) and "un-augmented image" in texts(app)


def submit_training_form(app: AppTest) -> None:
    """Press the training form's Train button."""
    next(button for button in app.button if button.label == "Train").click().run()


def test_training_form_trains_a_run_and_refuses_bad_names(workspace):
    app = open_app("runs")
    app.text_input(key="run_name").set_value("fmnist-mlp")
    submit_training_form(app)
    assert any("already exists" in error.value for error in app.error)
    app.text_input(key="run_name").set_value("../escape")
    submit_training_form(app)
    assert any("invalid run id" in error.value for error in app.error)
    app.text_input(key="run_name").set_value("tiny-new")
    app.number_input(key="max_train").set_value(100)
    app.number_input(key="max_test").set_value(20)
    app.number_input(key="first_epochs").set_value(1)
    submit_training_form(app)
    assert not app.error
    assert "tiny-new" in workspace.run_ids()
    app.button(key="open_trained_tiny-new").click().run()
    assert app.selectbox(key="run").value == "tiny-new"


# --- Map ---------------------------------------------------------------------------------------------------------


def test_map_colours_by_label_flag_and_influence():
    app = open_app("map")
    assert app.get("plotly_chart")
    assert "Draw a box or lasso" in texts(app)
    app.segmented_control(key="map_colour").set_value("flag").run()
    assert not app.exception and app.get("plotly_chart")
    app.segmented_control(key="map_colour").set_value("influence on a test sample").run()
    assert not app.exception
    assert app.selectbox(key="query").value is not None and app.get("plotly_chart")


# --- Mislabels: training dynamics ----------------------------------------------------------------------------------


def test_mislabels_opens_on_the_dynamics_ranking_with_data_map_curve_and_why(workspace):
    app = open_app("mislabels", run="fmnist-noisy")
    assert app.selectbox(key="ranking").value == "dynamics"
    text = texts(app)
    assert "Draw a box or lasso on the map to review the examples inside it." in text
    assert "**Why suspected**" in text
    assert len(app.get("plotly_chart")) == 3  # the data map, the suspect's training curve, the recall curves
    app.segmented_control(key="mislabels_curve").set_value("margin").run()
    assert not app.exception and len(app.get("plotly_chart")) == 3


def test_mislabels_map_selection_is_the_review_queue_until_cleared(workspace):
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    app.query_params.update(run="fmnist-noisy")
    app.run()
    app.switch_page("views/mislabels.py")
    app.session_state["mislabels_selection_fmnist-noisy"] = [3, 5, 7]  # what a lasso around three examples stores
    app.run()
    assert not app.exception
    assert "Suspect 1 of 3" in texts(app) and "Reviewing the 3 examples selected on the map" in texts(app)
    assert sorted(int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")) == [3, 5, 7]
    app.button(key="mislabels_clear_selection").click().run()
    assert "Suspect 1 of 600" in texts(app)


def test_mislabels_filters_by_verdict_and_not_yet_reviewed(workspace):
    app = open_app("mislabels", run="fmnist-noisy")
    flags = Annotations(workspace.annotations_path).flags("fmnist-noisy")
    app.pills(key="mislabels_show").set_value(["not yet reviewed"]).run()
    assert f"Suspect 1 of {600 - len(flags)}" in texts(app)
    app.button(key=verdict_button(app, "ambiguous")).click().run()
    assert f"Suspect 1 of {599 - len(flags)}" in texts(app), "the flagged suspect left the queue, the next took its place"
    app.pills(key="mislabels_show").set_value(["ambiguous"]).run()
    ambiguous = sum(flag.kind == "ambiguous" for flag in Annotations(workspace.annotations_path).flags("fmnist-noisy").values())
    assert f"Suspect 1 of {ambiguous}" in texts(app)


def test_mislabels_of_a_run_without_a_record_rank_by_checkpoints_and_say_why(workspace, tmp_path, monkeypatch):
    import json
    import shutil

    root = tmp_path / "old"
    shutil.copytree(workspace.root / "runs" / "fmnist-noisy", root / "runs" / "fmnist-noisy", ignore=shutil.ignore_patterns("mislabels"))
    run = load_run(workspace, "fmnist-noisy")
    run_file = root / "runs" / "fmnist-noisy" / "run.json"
    payload = json.loads(run_file.read_text())
    payload.pop("record")  # as written before runs had a training record
    payload["trajectory"] = {"stage": run.trajectory.stage, "lr": run.trajectory.lr, "momentum": run.trajectory.momentum,
                             "batch_size": run.trajectory.batch_size, "optimizer": run.trajectory.optimizer}
    run_file.write_text(json.dumps(payload))
    shutil.rmtree(root / "runs" / "fmnist-noisy" / "record")
    monkeypatch.setenv("TDX_WORKSPACE", str(root))
    app = open_app("mislabels", run="fmnist-noisy")
    assert app.selectbox(key="ranking").value == "loss_avg"
    assert "dynamics" not in app.selectbox(key="ranking").options
    text = texts(app)
    assert "has no training record" in text and "Ranking by loss_avg" in text
    assert "Draw a box or lasso" not in text and "Why suspected" not in text
    assert "Suspect 1 of 600" in text


# --- Scores on demand, replay, the LDS ground truth's mode ----------------------------------------------------------


def test_explore_scores_only_the_block_of_the_query(workspace, monkeypatch):
    from attribution_core.jobs import kinds
    from attribution_core.jobs.ready import QUERY_BLOCK

    calls = []
    real_attribute = kinds.attribute_scores

    def recording(run, method, *, queries=None, **options):
        calls.append((run.run_id, method, None if queries is None else [int(query) for query in queries]))
        return real_attribute(run, method, queries=queries, **options)

    monkeypatch.setattr(kinds, "attribute_scores", recording)
    app = open_app(run="fmnist-two-stage", method="graddot", query="70")  # no other test scores this run with graddot
    block = list(range(64, 96))
    assert QUERY_BLOCK == 32 and calls == [("fmnist-two-stage", "graddot", block)]
    assert len(button_keys(app, "results_proponents_")) == 10
    stored = [artifact.inputs["queries"] for artifact in workspace.artifacts("fmnist-two-stage", "scores")]
    assert block in stored
    assert all(queries == list(range(queries[0], queries[0] + len(queries))) and queries[0] % QUERY_BLOCK == 0
               and len(queries) <= QUERY_BLOCK for queries in stored), "only whole blocks are stored, never the test set"
    open_app(run="fmnist-two-stage", method="graddot", query="90")
    assert len(calls) == 1, "another sample of the same block is served from the block"


def test_replay_is_offered_for_the_demo_runs_and_explains_one_query(workspace):
    from app.components.core_calls import method_choices

    for run_id in ("fmnist-mlp", "fmnist-mlp-early", "fmnist-two-stage", "fmnist-noisy"):
        assert "replay" in method_choices(load_run(workspace, run_id)), run_id
    started = time.monotonic()
    app = open_app(run="fmnist-two-stage", method="replay", query="3")
    seconds = time.monotonic() - started
    assert app.selectbox(key="method").value == "replay"
    assert "replay (exact)" in app.selectbox(key="method").options
    assert len(button_keys(app, "results_proponents_")) == 10 and not app.error
    assert "Scores: replay (exact)'s estimate" in texts(app) and "positive = raised the margin of" in texts(app)
    assert seconds < 60, f"replay of one block took {seconds:.0f} s"


def test_compare_lds_explains_the_mode_and_computes_a_small_order_keeping_ground_truth():
    app = open_app("compare", run="fmnist-two-stage")
    assert "Reshuffled: retrain from scratch on random halves of the training set." in texts(app)
    app.segmented_control(key="lds_mode").set_value("order_keeping").run()
    assert app.number_input(key="lds_subsets").value == 20 and app.slider(key="lds_alpha").value == pytest.approx(0.95)
    assert "Order-keeping: the same batches with 5% of the examples weighted 0 — what replay differentiates." in texts(app)
    app.number_input(key="lds_subsets").set_value(3).run()
    app.button(key="lds_compute").click().run()
    assert not app.exception and not app.error
    assert "order-keeping, 3 subsets of 95%" in texts(app), "listed among the stored ground truths"
    app.multiselect(key="compare_methods").set_value(["trak", "replay"]).run()  # replay's LDS queries are scored as jobs
    assert not app.exception and not app.error
    assert list(table_with(app, "LDS")["method"]) == ["TRAK", "replay (exact)"]
    assert len(app.get("plotly_chart")) == 2
    again = open_app("compare", run="fmnist-two-stage")  # a new session: the scores are stored now, the ground truth too
    again.segmented_control(key="lds_mode").set_value("order_keeping").run()
    again.number_input(key="lds_subsets").set_value(3).run()
    again.multiselect(key="compare_methods").set_value(["trak", "replay"]).run()
    assert list(table_with(again, "LDS")["method"]) == ["TRAK", "replay (exact)"]
