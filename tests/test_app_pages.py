"""Each page of the app, run headless with Streamlit's AppTest on a copy of the tiny demo workspace."""
from __future__ import annotations

import io
import time

import pytest
import torch
from helpers_app import MAIN, TIMEOUT, button_keys, image_captions, open_app, place_of, table_with, texts
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.components.flagging import VERDICT_KEYS
from attribution_core.annotations import FLAG_KINDS, Annotations
from attribution_core.api import METHODS, attribute, default_checkpoints, self_influence
from attribution_core.evaluation.lds import LdsSettings
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace

GROUND_TRUTH = LdsSettings(n_subsets=6)
pytestmark = pytest.mark.usefixtures("app_serves_workspace")  # jobs inline (tests/test_app_jobs.py covers workers)


@pytest.fixture(scope="module")
def workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace (these tests flag examples and delete a checkpoint), with LDS ground truth."""
    return demo_copy("app_pages", GROUND_TRUTH)


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
    grid_captions = [caption for caption in image_captions(app) if caption.startswith("#")]
    assert grid_captions and all("→" in caption for caption in grid_captions)


def test_flag_from_explore_is_saved_and_seen_by_a_new_session(workspace):
    app = open_app()
    first = button_keys(app, "results_proponents_")[0]
    index = int(first.removeprefix("results_proponents_"))
    app.button(key=first).click().run()
    assert f"Training example #{index}" in texts(app)
    app.button(key="inspect_outlier").click().run()
    assert not app.exception
    example_id = int(load_run(workspace, "fmnist-mlp").datasets()[0].ids[index])
    assert Annotations(workspace.annotations_path).flags("fmnist-mlp")[example_id].kind == "outlier"
    again = open_app()
    assert ":material/flag: outlier" in texts(again)


def test_the_dialogs_verdict_line_is_drawn_before_any_verdict_so_another_tabs_verdict_moves_no_control(workspace):
    app = open_app()
    first = button_keys(app, "results_proponents_")[0]
    index = int(first.removeprefix("results_proponents_"))
    example_id = int(load_run(workspace, "fmnist-mlp").datasets()[0].ids[index])
    Annotations(workspace.annotations_path).remove_flag("fmnist-mlp", example_id)
    app.button(key=first).click().run()
    lines = [line for line in texts(app).splitlines() if line.startswith("Current verdict:")]
    assert lines == ["Current verdict: :gray[none yet]"]
    order = [key for key in button_keys(app, "inspect_") if key.removeprefix("inspect_") in FLAG_KINDS]
    Annotations(workspace.annotations_path).set_flag("fmnist-mlp", example_id, "ambiguous")  # another tab's verdict
    app.run()
    lines = [line for line in texts(app).splitlines() if line.startswith("Current verdict:")]
    assert len(lines) == 1 and ":material/flag: ambiguous" in lines[0]
    assert [key for key in button_keys(app, "inspect_") if key.removeprefix("inspect_") in FLAG_KINDS] == order


def test_source_scores_split_by_segment_and_restricted_to_chosen_segments():
    app = open_app(run="fmnist-two-stage", method="source")
    segments = app.select_slider(key="segments")
    assert segments.value == (0, 2)
    labels = segments.options
    assert any("pretrain" in label for label in labels) and any("finetune" in label for label in labels)
    assert app.get("plotly_chart"), "each segment's contribution"
    all_segments = [caption for caption in image_captions(app) if caption.startswith("**")]
    segments.set_value((2, 2)).run()
    assert not app.exception and not app.error
    assert [caption for caption in image_captions(app) if caption.startswith("**")] != all_segments
    assert "segment 3" in texts(app)


def test_counterfactual_says_whose_margin_moved_what_was_predicted_and_draws_the_chart_beside_it(workspace):
    from attribution_core.evaluation.counterfactual import CounterfactualSettings, stored_counterfactual

    app = open_app(run="fmnist-mlp-early")
    app.segmented_control(key="counterfactual_k").set_value("1 %").run()
    app.button(key="counterfactual_run").click().run()
    run, query = load_run(workspace, "fmnist-mlp-early"), app.selectbox(key="query").value
    checkpoints = default_checkpoints(run, "trak")
    result = stored_counterfactual(run, query, "trak", settings=CounterfactualSettings(k=0.01), checkpoints=checkpoints)
    _, test_set = run.datasets()
    base = sum(result.base_margins) / len(result.base_margins)
    after = base + result.margin_change("proponents")
    scores = attribute(run, "trak", queries=[query], checkpoints=checkpoints).values[0]
    predicted = -float(scores[result.removed["proponents"]].astype("float64").sum())
    text = texts(app)
    assert (f"The margin of **{test_set.class_names[result.true_label]}** (the true class) moved from **{base:+.2f}** to "
            f"**{after:+.2f}** when the top 6 proponents were removed") in text
    direction = "lower" if predicted <= 0 else "raise"
    assert f"Removing them was predicted to {direction} it by about **{abs(predicted):.2f}**" in text
    assert "Removing 6 random examples instead moved it by" in text
    block = app.get("plotly_chart")
    assert block, "the chart is drawn"


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


def shortcut(app: AppTest, key: str) -> str:
    """The keyboard shortcut of a button, as the user presses it (Streamlit stores it lower-case)."""
    return app.button(key=key).proto.shortcut.upper()


def result_indices(app: AppTest, side: str, grid: str = "results") -> list[int]:
    """Training indices a grid shows (side: "proponents" or "opponents" of a result grid, "" for a plain grid), in page order."""
    prefix = f"{grid}_{side}_" if side else f"{grid}_"
    return [int(key.removeprefix(prefix)) for key in button_keys(app, prefix) if key.removeprefix(prefix).isdigit()]


def test_explore_states_a_removal_methods_unit_and_a_similaritys_place(workspace):
    run = load_run(workspace, "fmnist-mlp")
    n_train = len(run.datasets()[0])
    app = open_app(method="trak")
    query = app.selectbox(key="query").value
    trak = attribute(run, "trak", queries=[query], checkpoints=default_checkpoints(run, "trak")).values[0]
    top = result_indices(app, "proponents")[0]
    assert "Score: TRAK's predicted drop of the margin of" in texts(app) and "if the example were removed from training" in texts(app)
    app.button(key=f"results_proponents_{top}").click().run()
    assert "removing it would lower the margin of" in texts(app) and f"by about {abs(trak[top]):.3g}" in texts(app)
    similar = open_app(method="repsim", query=str(query))  # a similarity, at one checkpoint
    assert similar.selectbox(key="checkpoints_repsim").value == len(run.checkpoints) - 1, "one checkpoint: a plain selector"
    assert not [slider for slider in similar.select_slider if slider.key == "checkpoints_repsim"]
    assert "representation similarity's similarity to this sample" in texts(similar)
    first = [caption for caption in image_captions(similar) if caption.startswith("**+")][0]
    assert first.split("**")[2].startswith(f" · top\u00a0{1 / n_train:.1%}"), first  # the strongest of all is in the top 1/N


def test_explore_grids_filter_by_verdict_and_class_and_sort(workspace):
    run = load_run(workspace, "fmnist-noisy")
    train_set = run.datasets()[0]
    app = open_app(run="fmnist-noisy", method="trak")
    query = app.selectbox(key="query").value
    values = attribute(run, "trak", queries=[query], checkpoints=default_checkpoints(run, "trak")).values[0]
    shown = result_indices(app, "proponents")
    store = Annotations(workspace.annotations_path)
    store.set_flags("fmnist-noisy", [int(train_set.ids[index]) for index in shown[:2]], "ambiguous", actor="test")
    app.pills(key="results_show").set_value(["not yet reviewed"]).run()
    flagged = {index for index, identity in enumerate(train_set.ids) if int(identity) in store.flags("fmnist-noisy")}
    expected = [int(index) for index in sorted(set(range(len(values))) - flagged, key=lambda index: -values[index])[:10]]
    assert result_indices(app, "proponents") == expected
    app.pills(key="results_show").set_value(["ambiguous"]).run()
    assert set(shown[:2]) <= set(result_indices(app, "proponents"))
    assert all(index in flagged for index in result_indices(app, "proponents") + result_indices(app, "opponents"))
    app.pills(key="results_show").set_value([]).run()
    app.multiselect(key="results_classes").set_value([3, 4]).run()
    assert all(int(train_set.y[index]) in (3, 4) for index in result_indices(app, "proponents") + result_indices(app, "opponents"))
    app.selectbox(key="results_sort").set_value("given class").run()
    names = [train_set.class_names[int(train_set.y[index])] for index in result_indices(app, "proponents")]
    assert names == sorted(names)


def test_explore_keys_step_queries_review_proponents_flag_advance_and_undo(workspace):
    from attribution_core.inspection import query_order, test_probabilities

    app = open_app(run="fmnist-two-stage", method="trak")
    assert {key: shortcut(app, key) for key in ("query_next", "query_previous", "open_next_proponent", "query_similar")} \
        == {"query_next": "N", "query_previous": "P", "open_next_proponent": "O", "query_similar": "S"}
    run = load_run(workspace, "fmnist-two-stage")
    probabilities = test_probabilities(run)
    order = query_order(probabilities.argmax(axis=1), probabilities.max(axis=1), run.datasets()[1].y.numpy())
    assert app.selectbox(key="query").value == order[0]
    app.button(key="query_next").click().run()
    assert app.selectbox(key="query").value == order[1]
    app.button(key="query_previous").click().run()
    assert app.selectbox(key="query").value == order[0]
    proponents = result_indices(app, "proponents")
    app.button(key="open_next_proponent").click().run()
    assert f"Training example #{proponents[0]}" in texts(app) and "1 of 20 in this grid" in texts(app)
    assert shortcut(app, "inspect_mislabeled") == "M"
    app.button(key="inspect_mislabeled").click().run()
    assert f"Training example #{proponents[1]}" in texts(app), "a verdict moves to the next example"
    assert any("flagged **mislabeled**" in toast.value and "Undo (U)" in toast.value for toast in app.toast)
    app.button(key="inspect_fine").click().run()
    ids = run.datasets()[0].ids
    store = Annotations(workspace.annotations_path)
    assert [store.flags("fmnist-two-stage")[int(ids[index])].kind for index in proponents[:2]] == ["mislabeled", "fine"]
    app.button(key="inspect_undo").click().run()
    assert int(ids[proponents[1]]) not in store.flags("fmnist-two-stage"), "undo takes back this tab's last verdict"
    assert store.flags("fmnist-two-stage")[int(ids[proponents[0]])].kind == "mislabeled"
    app.button(key="inspect_previous").click().run()
    assert f"Training example #{proponents[1]}" in texts(app)


def test_explore_note_is_saved_by_enter_once_the_example_has_a_verdict(workspace):
    app = open_app(run="fmnist-mlp-early", method="trak")
    index = result_indices(app, "opponents")[0]
    app.button(key=f"results_opponents_{index}").click().run()
    assert app.text_input(key=f"inspect_{index}_note").label == "Note (Enter saves it)"
    app.text_input(key=f"inspect_{index}_note").set_value("looks like a bag").run()
    example_id = int(load_run(workspace, "fmnist-mlp-early").datasets()[0].ids[index])
    store = Annotations(workspace.annotations_path)
    assert example_id not in store.flags("fmnist-mlp-early"), "no verdict yet: the note waits for one"
    app.button(key="inspect_outlier").click().run()
    assert store.flags("fmnist-mlp-early")[example_id].note == "looks like a bag"
    app.button(key="inspect_previous").click().run()
    app.text_input(key=f"inspect_{index}_note").set_value("a bag, surely").run()
    assert store.flags("fmnist-mlp-early")[example_id].note == "a bag, surely"
    assert store.flags("fmnist-mlp-early")[example_id].kind == "outlier"


def test_find_similar_from_the_dialog_and_from_the_query_lists_nearest_training_examples_by_cosine(workspace):
    import numpy as np

    from attribution_core.inspection import penultimate_representations

    app = open_app(run="fmnist-mlp", method="trak")
    query = app.selectbox(key="query").value
    index = result_indices(app, "proponents")[0]
    app.button(key=f"results_proponents_{index}").click().run()
    app.button(key="inspect_similar").click().run()
    assert f"Most similar to training example #{index}" in texts(app)
    run = load_run(workspace, "fmnist-mlp")
    train = penultimate_representations(run, split="train")
    cosines = train @ train[index] / (np.linalg.norm(train, axis=1) * np.linalg.norm(train[index]))
    cosines[index] = -np.inf
    assert result_indices(app, "", grid="similar") == list(np.argsort(-cosines, kind="stable")[:10])
    app.button(key="similar_close").click().run()
    assert "Most similar to" not in texts(app)
    app.button(key="query_similar").click().run()
    test = penultimate_representations(run, split="test")[query]
    test_cosines = train @ test / (np.linalg.norm(train, axis=1) * np.linalg.norm(test))
    assert f"Most similar to test sample {query}" in texts(app)
    assert result_indices(app, "", grid="similar") == list(np.argsort(-test_cosines, kind="stable")[:10])


def test_show_on_map_opens_the_map_with_the_example_in_the_url():
    app = open_app(run="fmnist-mlp", method="trak")
    index = result_indices(app, "proponents")[0]
    app.button(key=f"results_proponents_{index}").click().run()
    assert shortcut(app, "inspect_map") == "G"
    app.button(key="inspect_map").click().run()
    assert not app.exception
    assert app.query_params.get("example") in (str(index), [str(index)])


def test_segments_tab_only_for_a_method_with_segments_and_the_smoothness_check_only_for_estimates():
    assert [tab.label for tab in open_app(run="fmnist-two-stage", method="trak").tabs] == [
        "Counterfactual check", "Smoothness check", "Query your own image"]
    assert "Segments" in [tab.label for tab in open_app(run="fmnist-two-stage", method="source").tabs]
    assert "Smoothness check" not in [tab.label for tab in open_app(run="fmnist-two-stage", method="tracin").tabs], "a similarity"


def test_smoothness_check_replays_random_removals_on_request_and_shows_predicted_against_actual():
    app = open_app(run="fmnist-mlp-early", method="trak", query="4")
    assert "removals of" not in texts(app), "nothing is replayed before the button"
    app.button(key="smoothness_run").click().run()
    assert not app.exception and not app.error
    text = texts(app)
    assert "3 removals of 6 examples each; correlation of predicted and actual" in text
    again = open_app(run="fmnist-mlp-early", method="trak", query="4")  # stored: a new session shows it without a press
    assert "3 removals of 6 examples each" in texts(again)


# --- Mislabels ---------------------------------------------------------------------------------------------------


def verdict_button(app: AppTest, kind: str) -> str:
    """Key of the review card's button for one verdict kind."""
    return next(key for key in button_keys(app, "review_") if key.endswith(f"_{kind}"))


def test_mislabels_flags_advance_count_and_export(workspace):
    run, order, kinds = ranked(workspace)  # other tests of this module may have flagged examples of this run already
    ids = run.datasets()[0].ids
    after = {int(ids[i]): kind for i, kind in enumerate(kinds) if kind is not None} | {int(ids[order[0]]): "mislabeled",
                                                                                       int(ids[order[1]]): "fine"}
    counts = f"{sum(kind != 'fine' for kind in after.values())} flagged of {len(after)} reviewed"
    app = open_app("mislabels", run="fmnist-noisy")
    assert "Suspect 1 of 600" in texts(app)
    app.button(key=verdict_button(app, "mislabeled")).click().run()
    assert "Suspect 2 of 600" in texts(app)
    app.button(key=verdict_button(app, "fine")).click().run()
    assert counts in texts(app)
    table = table_with(app, "kind")
    assert dict(zip(table["example_id"].astype(int), table["kind"])) == after
    csv_text = Annotations(workspace.annotations_path).export_csv("fmnist-noisy", run.datasets()[0].class_names)
    assert len(csv_text.strip().splitlines()) == len(after) + 1
    assert set(table["example_id"].astype(str)) == {line.split(",")[1] for line in csv_text.strip().splitlines()[1:]}
    again = open_app("mislabels", run="fmnist-noisy")
    assert counts in texts(again), "flags survive a new session"


def test_mislabels_recall_opens_with_the_default_and_its_companions_under_readable_names(workspace):
    from attribution_core.evaluation import mislabel

    run = load_run(workspace, "fmnist-noisy")
    ranking_label = mislabel.ranking_label
    stored = [name for name in mislabel.rankings_for(run) if mislabel.stored_ranking(run, name) is not None]
    app = open_app("mislabels", run="fmnist-noisy")
    assert app.selectbox(key="ranking").options == [ranking_label(name) for name in mislabel.rankings_for(run)]
    assert "How well the rankings find the flipped labels" in texts(app)
    recall = table_with(app, "ranking")
    opened = ["dynamics", "aum", "confidence", "loss_avg", "margin_avg"]
    assert list(recall["ranking"])[: len(opened)] == [ranking_label(name) for name in opened]
    assert set(recall["ranking"]) == {ranking_label(name) for name in {*opened, *stored}}, "rankings stored already join"
    flipped = run.datasets()[0].flipped
    for name in opened:
        metrics = mislabel.mislabel_metrics(mislabel.rank_mislabels(run, name).scores, flipped)
        row = recall[recall["ranking"] == ranking_label(name)].iloc[0]
        assert row["found in top 10 %"] == pytest.approx(metrics["top10"]) and row["ROC-AUC"] == pytest.approx(metrics["auc"])


def test_mislabels_on_a_clean_run_has_no_recall_section():
    app = open_app("mislabels", run="fmnist-mlp")
    assert "How well the rankings find the flipped labels" not in texts(app)


def ranked(workspace, run_id: str = "fmnist-noisy"):
    """(run, its default ranking's order (training indices, most suspicious first), each example's verdict or None)."""
    from attribution_core.evaluation.mislabel import rank_mislabels

    run = load_run(workspace, run_id)
    flags = Annotations(workspace.annotations_path).flags(run_id)
    kinds = [flags[int(i)].kind if int(i) in flags else None for i in run.datasets()[0].ids]
    return run, rank_mislabels(run, "dynamics").order(), kinds


def test_mislabels_ticked_thumbnails_are_flagged_at_once_and_undone_as_one_action(workspace):
    run, _, kinds = ranked(workspace)
    ids = run.datasets()[0].ids
    app = open_app("mislabels", run="fmnist-noisy")
    shown = [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")]
    chosen = shown[1:4]
    for index in chosen:
        app.checkbox(key=f"check_suspect_{index}").check().run()
    flag_ticked = app.button(key="mislabels_flag_ticked")
    assert flag_ticked.label == "Flag 3 ticked" and "as mislabeled" in flag_ticked.help
    app.segmented_control(key="mislabels_bulk_kind").set_value("outlier").run()
    app.button(key="mislabels_flag_ticked").click().run()
    store = Annotations(workspace.annotations_path)
    assert [store.flags("fmnist-noisy")[int(ids[index])].kind for index in chosen] == ["outlier"] * 3
    assert not any(app.checkbox(key=f"check_suspect_{index}").value for index in chosen), "the ticks go once flagged"
    undo = app.button(key="mislabels_undo")
    assert undo.label == "Undo (3 examples)" and undo.proto.shortcut.lower() == "u" and "**U** undo" in texts(app)
    undo.click().run()
    flags = store.flags("fmnist-noisy")
    assert [flags[int(ids[index])].kind if int(ids[index]) in flags else None for index in chosen] == [kinds[i] for i in chosen]


def test_mislabels_bulk_mislabeled_saves_each_examples_suggested_label(workspace):
    run, _, _ = ranked(workspace)
    train_set, _ = run.datasets()
    with torch.no_grad():  # the default ranking suggests what the earliest checkpoint predicted
        earliest = run.load_model(0)(train_set.x).argmax(1).numpy()
    app = open_app("mislabels", run="fmnist-noisy")
    chosen = [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")][:6]
    for index in chosen:
        app.checkbox(key=f"check_suspect_{index}").check().run()
    app.button(key="mislabels_flag_ticked").click().run()
    flags = Annotations(workspace.annotations_path).flags("fmnist-noisy")
    expected = [None if earliest[index] == int(train_set.y[index]) else int(earliest[index]) for index in chosen]
    assert [flags[int(train_set.ids[index])].suggested_label for index in chosen] == expected
    assert any(label is not None for label in expected), "the top suspects of a run with flipped labels get suggestions"


def test_mislabels_ticks_survive_the_grid_pages_and_a_whole_page_can_be_ticked(workspace):
    app = open_app("mislabels", run="fmnist-noisy")
    first_page = [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")]
    app.pagination(key="suspects_page_dynamics").set_value(2).run()
    second_page = [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")]
    app.checkbox(key=f"check_suspect_{second_page[0]}").check().run()
    app.pagination(key="suspects_page_dynamics").set_value(1).run()
    app.button(key="mislabels_tick_page").click().run()
    assert all(app.checkbox(key=f"check_suspect_{index}").value for index in first_page)
    assert app.button(key="mislabels_flag_ticked").label == f"Flag {len(first_page) + 1} ticked"
    app.pagination(key="suspects_page_dynamics").set_value(2).run()
    assert [app.checkbox(key=f"check_suspect_{index}").value for index in second_page] == [True] + [False] * (len(second_page) - 1)
    app.button(key="mislabels_untick").click().run()
    assert app.button(key="mislabels_flag_ticked").disabled
    assert not any(app.checkbox(key=f"check_suspect_{index}").value for index in second_page)


def test_mislabels_top_k_asks_to_confirm_with_the_count_then_flags_the_first_k(workspace):
    run, order, kinds = ranked(workspace)
    ids = run.datasets()[0].ids
    unreviewed = [int(index) for index in order if kinds[index] is None]
    app = open_app("mislabels", run="fmnist-noisy")
    app.pills(key="mislabels_show").set_value(["not yet reviewed"]).run()
    app.number_input(key="mislabels_top_k").set_value(7).run()
    app.segmented_control(key="mislabels_bulk_kind").set_value("ambiguous").run()
    review_place = place_of(app, "mislabels_undo")
    app.button(key="mislabels_ask_top").click().run()
    assert place_of(app, "mislabels_undo") == review_place, "the confirmation moves no review key's fragment"
    assert any("Flag the first **7** suspects of this queue, ranked by Training dynamics" in warning.value
               and "as **ambiguous**" in warning.value and "already have a verdict" not in warning.value for warning in app.warning)
    app.button(key="mislabels_cancel_top").click().run()
    assert not app.warning and Annotations(workspace.annotations_path).flags("fmnist-noisy").keys() == {
        int(ids[i]) for i, kind in enumerate(kinds) if kind is not None}, "cancelled: nothing saved"
    app.button(key="mislabels_ask_top").click().run()
    app.button(key="mislabels_confirm_top").click().run()
    flags = Annotations(workspace.annotations_path).flags("fmnist-noisy")
    assert [flags[int(ids[index])].kind for index in unreviewed[:7]] == ["ambiguous"] * 7
    assert f"Suspect 1 of {len(unreviewed) - 7}" in texts(app), "they left the not-yet-reviewed queue"
    app.button(key="mislabels_undo").click().run()
    assert f"Suspect 1 of {len(unreviewed)}" in texts(app)


def test_mislabels_queue_filters_by_given_class_and_suspicion_and_sorts(workspace):
    run, order, _ = ranked(workspace)
    labels = run.datasets()[0].y.numpy()
    top_tenth = order[: round(0.1 * len(order))]
    app = open_app("mislabels", run="fmnist-noisy")
    per_page = len(button_keys(app, "suspect_"))
    app.select_slider(key="mislabels_share").set_value(0.1).run()
    assert f"Suspect 1 of {len(top_tenth)}" in texts(app)
    shirt = run.datasets()[0].class_names.index("Shirt")
    app.multiselect(key="mislabels_classes").set_value([shirt]).run()
    in_class = [int(index) for index in top_tenth if labels[index] == shirt]
    assert f"Suspect 1 of {len(in_class)}" in texts(app)
    assert [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")] == in_class[:per_page]
    app.selectbox(key="mislabels_order").set_value("least suspicious first").run()
    assert [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")] == in_class[::-1][:per_page]
    app.multiselect(key="mislabels_classes").set_value([]).run()
    app.selectbox(key="mislabels_order").set_value("given class").run()
    shown = [int(key.removeprefix("suspect_")) for key in button_keys(app, "suspect_")]
    assert shown == sorted(top_tenth, key=lambda index: labels[index])[:per_page], "by class, most suspicious first within one"


def test_mislabels_downloads_are_cleanlab_mask_and_fiftyone_dataset(workspace):
    import json
    import zipfile

    import numpy as np

    from app.components.downloads import cleanlab_zip, fiftyone_zip

    store = Annotations(workspace.annotations_path)
    run = load_run(workspace, "fmnist-noisy")
    train_set = run.datasets()[0]
    store.set_flags("fmnist-noisy", [int(train_set.ids[2]), int(train_set.ids[5])], "mislabeled")
    store.set_flag("fmnist-noisy", int(train_set.ids[8]), "outlier")
    app = open_app("mislabels", run="fmnist-noisy")
    assert [(button.key, button.label, button.disabled) for button in app.get("download_button") if button.key.startswith("export_")] == [
        ("export_csv", "CSV", False), ("export_cleanlab", "cleanlab mask", False), ("export_fiftyone", "FiftyOne dataset", False)]
    flags = store.flags("fmnist-noisy")
    mask_archive = zipfile.ZipFile(io.BytesIO(cleanlab_zip(run, store)))
    assert sorted(mask_archive.namelist()) == ["label_issues.npy", "label_issues.npy.json"]
    mask = np.load(io.BytesIO(mask_archive.read("label_issues.npy")), allow_pickle=False)
    assert mask.dtype == bool and mask.shape == (len(train_set),)
    assert json.loads(mask_archive.read("label_issues.npy.json"))["example_id"] == train_set.ids.tolist()
    assert set(np.flatnonzero(mask)) == {i for i, example_id in enumerate(train_set.ids)
                                         if flags.get(int(example_id)) and flags[int(example_id)].kind == "mislabeled"}
    archive = zipfile.ZipFile(io.BytesIO(fiftyone_zip(run, store)))
    names = set(archive.namelist())
    samples = json.loads(archive.read("fmnist-noisy-flags/samples.json"))["samples"]
    assert json.loads(archive.read("fmnist-noisy-flags/metadata.json"))["info"]["classes"] == list(train_set.class_names)
    assert {sample["example_id"]: sample["tags"] for sample in samples} == {example_id: [flag.kind] for example_id, flag in flags.items()}
    assert all(f"fmnist-noisy-flags/{sample['filepath']}" in names for sample in samples)


# --- Compare -----------------------------------------------------------------------------------------------------


def test_compare_states_agreement_and_lds_with_stored_ground_truth():
    app = open_app("compare")
    text = texts(app)
    assert "**TRAK** and **TracIn** agree on" in text and "of their top 10** proponents" in text
    assert "rank correlation over all 600 training examples" in text and "it can be low while the tops agree" in text
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


def test_map_coloured_by_flag_shows_a_verdict_given_in_another_tab_and_its_undo(workspace):
    store = Annotations(workspace.annotations_path)
    example_id = int(load_run(workspace, "fmnist-mlp").datasets()[0].ids[3])
    assert example_id not in store.flags("fmnist-mlp")
    app = open_app("map")
    app.segmented_control(key="map_colour").set_value("flag").run()

    def outliers() -> list[tuple[str, int]]:
        return [point for trace in chart_points(app) if trace["name"] == "outlier" for point in trace["points"]]

    assert ("train", 3) not in outliers()
    store.set_flag("fmnist-mlp", example_id, "outlier", actor="another tab")
    app.run()
    assert ("train", 3) in outliers(), "the figure is made anew when the verdicts change"
    store.undo("fmnist-mlp", actor="another tab")
    app.run()
    assert ("train", 3) not in outliers()


def chart_points(app: AppTest, chart: int = 0) -> list[dict]:
    """The traces of a plotly chart of the page: name, marker, and the (split, index) of each point."""
    import base64
    import json

    import numpy as np

    def array(value):
        if isinstance(value, dict) and "bdata" in value:  # plotly's typed-array encoding
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return value

    spec = json.loads(app.get("plotly_chart")[chart].proto.spec)
    return [{"name": trace["name"], "marker": {key: array(value) for key, value in trace["marker"].items()},
             "points": [(split, int(index)) for split, index in trace["customdata"]], "layout": spec["layout"]}
            for trace in spec["data"]]


def map_with_selection(run_id: str, train: list[int], test: list[int] = ()) -> AppTest:
    """The Map page of a run with examples chosen as a box or lasso around them would choose them."""
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    app.query_params.update(run=run_id)
    app.run()
    app.switch_page("views/map.py")
    app.session_state[f"map_selection_{run_id}"] = {"train": list(train), "test": list(test)}
    app.run()
    assert not app.exception, [exception.message for exception in app.exception]
    return app


def test_map_selection_is_flagged_at_once_and_undone_as_one_action(workspace):
    store = Annotations(workspace.annotations_path)
    ids = load_run(workspace, "fmnist-mlp").datasets()[0].ids
    chosen = [11, 12, 13, 14, 15]
    before = {index: store.flags("fmnist-mlp").get(int(ids[index])) for index in chosen}
    app = map_with_selection("fmnist-mlp", chosen, [0])
    assert "**Selection:** 5 training examples, 1 test samples" in texts(app)
    assert button_keys(app, "map_selection_") == [f"map_selection_{index}" for index in chosen]
    app.segmented_control(key="map_bulk_kind").set_value("ambiguous").run()
    assert app.button(key="map_flag_selection").label == "Flag 5 selected" and "as ambiguous" in app.button(key="map_flag_selection").help
    app.button(key="map_flag_selection").click().run()
    flags = store.flags("fmnist-mlp")
    assert all(flags[int(ids[index])].kind == "ambiguous" for index in chosen)
    assert app.button(key="map_undo").label == "Undo (5 examples)" and app.button(key="map_undo").proto.shortcut.lower() == "u"
    assert open_app("map").button(key="map_undo").disabled, "another tab has nothing of its own to undo"
    app.button(key="map_undo").click().run()
    assert {index: store.flags("fmnist-mlp").get(int(ids[index])) for index in chosen} == before
    assert app.button(key="map_undo").disabled


def test_map_selection_flagged_mislabeled_saves_the_default_rankings_suggested_labels(workspace):
    run, order, _ = ranked(workspace)
    train_set, _ = run.datasets()
    open_app("mislabels", run="fmnist-noisy")  # stores the default ranking, as the job `tdx demo` queues does
    with torch.no_grad():  # the default ranking suggests what the earliest checkpoint predicted
        earliest = run.load_model(0)(train_set.x).argmax(1).numpy()
    chosen = [int(index) for index in order[:6]]
    app = map_with_selection("fmnist-noisy", chosen)
    app.button(key="map_flag_selection").click().run()
    flags = Annotations(workspace.annotations_path).flags("fmnist-noisy")
    expected = [None if earliest[index] == int(train_set.y[index]) else int(earliest[index]) for index in chosen]
    assert [flags[int(train_set.ids[index])].kind for index in chosen] == ["mislabeled"] * len(chosen)
    assert [flags[int(train_set.ids[index])].suggested_label for index in chosen] == expected
    assert any(label is not None for label in expected), "the top suspects of a run with flipped labels get suggestions"


def test_map_link_marks_one_training_example_that_opens_and_can_be_flagged(workspace):
    app = open_app("map", example="42")
    linked = [trace for trace in chart_points(app) if trace["name"] == "train #42 (linked)"]
    assert len(linked) == 1 and linked[0]["points"] == [("train", 42)] and linked[0]["marker"]["symbol"] == "star"
    assert "**Linked example:** training example #42" in texts(app)
    app.button(key="map_selection_42").click().run()
    assert "**Training example #42**" in texts(app)
    assert {kind: app.button(key=f"map_open_{kind}").proto.shortcut.lower() for kind in VERDICT_KEYS} == {
        kind: key.lower() for kind, key in VERDICT_KEYS.items()}, "the dialog's verdicts have their review keys"
    app.button(key="map_open_outlier").click().run()
    example_id = int(load_run(workspace, "fmnist-mlp").datasets()[0].ids[42])
    assert Annotations(workspace.annotations_path).flags("fmnist-mlp")[example_id].kind == "outlier"
    for wrong in ("100000", "-1", "shirt"):
        app = open_app("map", example=wrong)
        assert not any("linked" in trace["name"] for trace in chart_points(app)) and "Linked example" not in texts(app)


def test_map_influence_colours_are_signed_ranks_of_the_scores_with_the_legend_under_the_map(workspace):
    import numpy as np

    from attribution_core.api import default_checkpoints
    from attribution_core.api import stored_scores as stored
    from attribution_core.jobs.ready import query_block

    app = open_app("map")
    app.segmented_control(key="map_colour").set_value("influence on a test sample").run()
    query = app.selectbox(key="query").value
    run = load_run(workspace, "fmnist-mlp")
    block = query_block(query, len(run.datasets()[1]))
    values = stored(run, "trak", queries=block, checkpoints=default_checkpoints(run, "trak")).values[block.index(query)]
    trace = next(trace for trace in chart_points(app) if trace["name"] == "training examples")
    colour = dict(zip((index for _, index in trace["points"]), trace["marker"]["color"]))
    magnitude_order = np.argsort(np.abs(values), kind="stable")
    expected = np.empty(len(values))
    expected[magnitude_order] = np.arange(len(values)) / (len(values) - 1)  # the k-th smallest |score| sits at k / (n - 1)
    assert np.allclose([colour[index] for index in range(len(values))], np.sign(values) * expected)
    assert [index for _, index in trace["points"]][-1] == int(np.argmax(np.abs(values))), "the strongest drawn on top"
    bar = trace["marker"]["colorbar"]
    assert bar["ticktext"][-1] == f"+{np.abs(values).max():.2g}" and bar["tickvals"][-1] == 1
    legend = trace["layout"]["legend"]
    assert legend["orientation"] == "h" and legend["y"] < 0 and bar["x"] >= 1, "legend under the map, colour bar beside it"


def test_a_map_of_more_points_than_it_draws_shows_a_fixed_sample_with_every_verdict_and_says_so(workspace, monkeypatch):
    import numpy as np

    from app.components import embedding
    from attribution_core.api import stored_scores
    from attribution_core.jobs.ready import query_block

    monkeypatch.setattr(embedding, "MAX_DRAWN", 200)  # the test demo's 600 training examples stand for a large run
    store = Annotations(workspace.annotations_path)
    train_set, test_set = load_run(workspace, "fmnist-mlp").datasets()
    app = open_app("map")

    def drawn(split: str) -> list[int]:
        return [index for trace in chart_points(app) for kind, index in trace["points"] if kind == split]

    assert len(train_set) > 200 and len(drawn("train")) == 200 and len(set(drawn("train"))) == 200
    assert len(test_set) <= 200 and sorted(drawn("test")) == list(range(len(test_set))), "a split within the limit is drawn whole"
    assert "Drawn: a fixed random 200 of each split's points" in texts(app)
    undrawn = next(index for index in range(len(train_set)) if index not in set(drawn("train")))
    store.set_flag("fmnist-mlp", int(train_set.ids[undrawn]), "outlier", actor="another tab")
    app.segmented_control(key="map_colour").set_value("flag").run()
    outliers = [index for trace in chart_points(app) if trace["name"] == "outlier" for _, index in trace["points"]]
    assert undrawn in outliers, "a verdict is drawn whether or not its point is in the sample"
    app.segmented_control(key="map_colour").set_value("influence on a test sample").run()
    query, run = app.selectbox(key="query").value, load_run(workspace, "fmnist-mlp")
    block = query_block(query, len(test_set))
    values = stored_scores(run, "trak", queries=block, checkpoints=default_checkpoints(run, "trak")).values[block.index(query)]
    trace = next(trace for trace in chart_points(app) if trace["name"] == "training examples")
    shown = [index for _, index in trace["points"]]
    assert 200 <= len(shown) <= 220 and set(np.argsort(-np.abs(values))[:20]) <= set(shown), "the strongest tenth always drawn"
    colour = dict(zip(shown, trace["marker"]["color"]))
    ranks = np.searchsorted(np.sort(np.abs(values)), np.abs(values)) / (len(values) - 1)
    assert np.allclose([colour[index] for index in shown], (np.sign(values) * ranks)[shown]), "ranked among all the scores"


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
    assert "Score: replay (exact)'s predicted drop of the margin of" in texts(app)
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
