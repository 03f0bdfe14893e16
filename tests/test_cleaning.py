"""Cleaning plans end to end on small runs: made from flags and a ranking, predicted, applied by retraining, exported, and refused.

The expected values are computed here independently: actions by the rules the user reads (a
mislabeled flag with a suggestion relabels, ...), what a retrain trained on as a spying training
function saw it, and the exports as the project's own loaders read them back.
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attribution_core import api
from attribution_core.annotations import Annotations
from attribution_core.cleaning.experiment import (
    ExperimentSettings,
    clean_and_retrain,
    cleaned_run_id,
    compare,
    control_plan,
    stored_experiment,
)
from attribution_core.cleaning.export import cleaned_training_set, export_cleaned
from attribution_core.cleaning.plan import (
    CleaningPlan,
    PlanEntry,
    PlanSource,
    check_plan,
    load_plan,
    load_source,
    make_plan,
    plan_arrays,
    plan_csv,
    save_source,
    store_plan,
)
from attribution_core.cleaning.predict import predict_effect, relabelled_view, stored_prediction
from attribution_core.cli import main
from attribution_core.data import DataSpec, load_dataset
from attribution_core.errors import PlanError, SettingsError
from attribution_core.evaluation.mislabel import MislabelRanking, rank_mislabels
from attribution_core.jobs.kinds import cleaning_experiment_job, cleaning_prediction_job, job_kind, load_result
from attribution_core.methods.exact import ExactInfluence
from attribution_core.models import ModelSpec
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.runs.recorder import Recorder
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.session import TrainingSession
from attribution_core.runs.training import record_run, train
from attribution_core.store import Workspace

DIGITS = DataSpec(source="digits", test_size=30, split_seed=0, max_train=80)
MODEL = ModelSpec("mlp", {"hidden": [8]})
METHOD = "exact_if"
"""Exact influence: the small MLP's exact scores, quick to fit twice (with the given and the plan's labels)."""

SEEN: list[dict] = []
"""What each call of spy_loop trained on: its seed and, per training row drawn, the label it was given."""


def spy_loop(session: TrainingSession) -> None:
    """Two epochs of plain SGD that note the seed and every (row, label) the session handed out."""
    model, drawn = session.model, {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        for batch in session.batches(16):
            losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
            optimizer.zero_grad()
            batch.loss(losses).backward()
            optimizer.step()
            session.step(optimizer, batch, losses)
            drawn |= dict(zip(batch.rows.tolist(), batch.y.tolist()))
        session.checkpoint()
    SEEN.append({"seed": session.seed, "drawn": drawn})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("cleaning_ws"))


@pytest.fixture(scope="module")
def run(workspace) -> Run:
    """tdx's recipe on 80 digits, six checkpoints."""
    recipe = Recipe((Stage(epochs=6, lr=0.1, batch_size=16),), seed=3, checkpoints=CheckpointPolicy(every_epochs=1))
    return train(DIGITS, MODEL, recipe, workspace, "digits-small")


@pytest.fixture(scope="module")
def spied(workspace) -> Run:
    """A run of spy_loop, recorded as a training function tdx can call again."""
    return record_run(workspace, "spied", spy_loop, data=DIGITS, model=MODEL, seed=7)


def entries(*rows: tuple) -> tuple[PlanEntry, ...]:
    return tuple(PlanEntry(*row) for row in rows)


def a_plan(run: Run) -> CleaningPlan:
    """Relabel the first two training examples to the next class, remove the next two, keep the fifth."""
    train_set, _ = run.datasets()
    ids, given = train_set.ids.tolist(), train_set.y.tolist()
    return CleaningPlan(run.run_id, entries((ids[0], "relabel", (given[0] + 1) % 10), (ids[1], "relabel", (given[1] + 1) % 10),
                                            (ids[2], "remove"), (ids[3], "remove"), (ids[4], "keep")))


# --- the plan ------------------------------------------------------------------------------------------------------


def test_flags_and_a_rankings_top_k_make_the_default_actions_and_edits_win(run, workspace):
    train_set, _ = run.datasets()
    ids, given = train_set.ids.tolist(), train_set.y.tolist()
    store = Annotations(workspace.root / "plan_flags.sqlite")
    store.set_flag(run.run_id, ids[0], "mislabeled", suggested_label=(given[0] + 3) % 10)
    store.set_flag(run.run_id, ids[1], "mislabeled")
    store.set_flag(run.run_id, ids[2], "mislabeled", suggested_label=given[2])  # "suggests" the class it has: no suggestion
    store.set_flag(run.run_id, ids[3], "outlier")
    store.set_flag(run.run_id, ids[4], "ambiguous")
    store.set_flag(run.run_id, ids[5], "fine")
    store.set_flag(run.run_id, ids[7], "fine")
    scores = np.zeros(len(train_set))
    scores[[6, 7, 8]] = [3.0, 2.0, 1.0]  # top 3: 6, 7, 8
    suggested = np.asarray(given).copy()
    suggested[6] = (given[6] + 1) % 10  # 8 gets no other class: removed
    ranking = MislabelRanking("loss", scores, suggested, [], 0.0)
    plan = make_plan(run, PlanSource(ranking="loss", top_k=3), store.flags(run.run_id), ranking)
    assert {entry.example_id: (entry.action, entry.label) for entry in plan.entries} == {
        ids[0]: ("relabel", (given[0] + 3) % 10), ids[1]: ("remove", None), ids[2]: ("remove", None), ids[3]: ("remove", None),
        ids[4]: ("keep", None), ids[6]: ("relabel", (given[6] + 1) % 10), ids[7]: ("keep", None), ids[8]: ("remove", None)}
    assert ids[5] not in {entry.example_id for entry in plan.entries}  # fine, and not a suspect
    edited = PlanSource(ranking="loss", top_k=3).edited(ids[0], "remove").edited(ids[4], "relabel", (given[4] + 5) % 10)
    plan = make_plan(run, edited, store.flags(run.run_id), ranking)
    actions = {entry.example_id: (entry.action, entry.label) for entry in plan.entries}
    assert actions[ids[0]] == ("remove", None) and actions[ids[4]] == ("relabel", (given[4] + 5) % 10)
    assert plan.counts() == {"relabel": 2, "remove": 5, "keep": 1}


def test_a_plan_changes_exactly_its_rows_and_is_stored_by_what_it_does(run):
    train_set, _ = run.datasets()
    given = train_set.y.numpy()
    plan = a_plan(run)
    keep, labels = plan_arrays(run, plan)
    assert np.flatnonzero(~keep).tolist() == [2, 3]
    assert np.flatnonzero(labels != given).tolist() == [0, 1]
    assert labels[[0, 1]].tolist() == [(given[0] + 1) % 10, (given[1] + 1) % 10]
    key = store_plan(run, plan)
    assert load_plan(run, key) == plan
    renamed = CleaningPlan(run.run_id, tuple(PlanEntry(e.example_id, e.action, e.label, "another reason") for e in plan.entries))
    assert renamed.key() == key  # the key is what the plan does, not why
    assert CleaningPlan(run.run_id, plan.entries[1:]).key() != key
    rows = plan_csv(run, plan).splitlines()
    assert rows[0] == "example_id,train_index,given_label,given_class,action,new_label,new_class,origin"
    assert rows[1].split(",")[:7] == [str(train_set.ids[0]), "0", str(given[0]), train_set.class_names[given[0]], "relabel",
                                      str((given[0] + 1) % 10), train_set.class_names[(given[0] + 1) % 10]]
    save_source(run, PlanSource(top_k=0).edited(int(train_set.ids[9]), "remove"))
    assert load_source(run).edits == ((int(train_set.ids[9]), "remove", None),)


# --- the prediction ------------------------------------------------------------------------------------------------


def test_the_prediction_adds_the_removals_and_the_relabelled_fits_scores(run):
    plan = a_plan(run)
    predicted = predict_effect(run, plan, METHOD)
    train_set, test_set = run.datasets()
    scores = api.attribute(run, METHOD).values
    keep, labels = plan_arrays(run, plan)
    # the relabelled score by hand: exact influence fitted on the final checkpoint with the plan's labels
    inputs = AttributionInputs(models=[run.load_model(-1)], checkpoint_lrs=[0.1], train_x=train_set.x, train_y=torch.as_tensor(labels))
    method = ExactInfluence()
    relabelled = method.score(method.fit(inputs), inputs, test_set.x, test_set.y).numpy()
    expected = -scores[:, [2, 3]].sum(1) + (relabelled[:, [0, 1]] - scores[:, [0, 1]]).sum(1)
    np.testing.assert_allclose(predicted.change, expected, rtol=1e-4, atol=1e-6)
    assert stored_prediction(run, plan, METHOD).change.tolist() == predicted.change.tolist()  # answered from the store
    after = predicted.margins + predicted.change
    assert set(predicted.to_right) == set(np.flatnonzero(~predicted.correct_before & (after > 0)))
    assert set(predicted.to_wrong) == set(np.flatnonzero(predicted.correct_before & (predicted.margins > 0) & (after < 0)))
    np.testing.assert_allclose(predicted.accuracy()[1], (predicted.correct_before.sum() + len(predicted.to_right)
                                                         - len(predicted.to_wrong)) / len(test_set))
    assert np.array_equal(api.attribute(run, METHOD).values, scores)  # the relabelled fit is stored apart from the run's own


def test_a_relabelled_view_is_the_run_with_other_labels_and_keys_of_its_own(run):
    train_set, _ = run.datasets()
    labels = (train_set.y.numpy() + 1) % 10
    view = relabelled_view(run, labels)
    assert view.datasets()[0].y.tolist() == labels.tolist() and run.datasets()[0].y.tolist() == train_set.y.tolist()
    assert view.artifact("scores", queries=[0]).directory != run.artifact("scores", queries=[0]).directory
    assert view.artifact("scores", queries=[0]).directory == relabelled_view(run, labels).artifact("scores", queries=[0]).directory


# --- the experiment ------------------------------------------------------------------------------------------------


def test_the_retrains_apply_exactly_the_plan_and_the_control_with_the_same_seeds(spied):
    plan = a_plan(spied)
    train_set, _ = spied.datasets()
    keep, labels = plan_arrays(spied, plan)
    control_keep, control_labels = plan_arrays(spied, control_plan(spied, plan, 0))
    SEEN.clear()
    result = clean_and_retrain(spied, plan, ExperimentSettings(seeds=(0, 1), keep_run=False))
    # per seed offset: base (only for 1: offset 0's base is the run itself), cleaned, control, in that order
    cleaned_0, control_0, base_1, cleaned_1, control_1 = SEEN
    assert [call["seed"] for call in SEEN] == [7, 7, 8, 8, 8]
    everything = dict(enumerate(train_set.y.tolist()))
    for call, (rows, given) in ((cleaned_0, (keep, labels)), (cleaned_1, (keep, labels)), (control_0, (control_keep, control_labels)),
                                (control_1, (control_keep, control_labels))):
        assert call["drawn"] == {row: int(given[row]) for row in np.flatnonzero(rows)}
    assert base_1["drawn"] == everything
    assert (control_keep == keep).sum() < len(keep) and Counter(control_keep) == Counter(keep)  # other rows, as many
    assert (control_labels != train_set.y.numpy()).sum() == (labels != train_set.y.numpy()).sum()
    assert result.seeds == [0, 1] and result.margins["cleaned"].shape == (2, len(spied.datasets()[1]))
    SEEN.clear()
    assert stored_experiment(spied, plan, ExperimentSettings(seeds=(0, 1), keep_run=False)) is not None
    assert clean_and_retrain(spied, plan, ExperimentSettings(seeds=(0, 1), keep_run=False)).margins["control"].tolist() == \
        result.margins["control"].tolist() and SEEN == []  # stored: nothing retrained again


def test_the_cleaned_data_becomes_a_run_that_keeps_its_examples_ids(run):
    plan = a_plan(run)
    result = clean_and_retrain(run, plan, ExperimentSettings(seeds=(0,)))
    assert result.cleaned_run == cleaned_run_id(run, plan) == f"digits-small-cleaned-{plan.key()[:8]}"
    cleaned = load_run(run.workspace, result.cleaned_run)
    expected = cleaned_training_set(run, plan)
    cleaned_train, cleaned_test = cleaned.datasets()
    assert cleaned_train.ids.tolist() == expected.ids.tolist() and cleaned_train.y.tolist() == expected.y.tolist()
    assert torch.equal(cleaned_train.x, expected.x) and torch.equal(cleaned_test.x, run.datasets()[1].x)
    assert cleaned.load_model(-1) is not None and cleaned.trained_by == run.trained_by
    fared = compare(predict_effect(run, plan, METHOD), result)
    assert -1 <= fared.spearman <= 1 and fared.accuracy_change == pytest.approx(result.accuracy_change("cleaned")[0])


# --- exports -------------------------------------------------------------------------------------------------------


def test_the_npz_export_reads_back_as_the_cleaned_training_set_and_the_runs_test_set(run, tmp_path):
    plan = a_plan(run)
    export_cleaned(run, plan, "npz", tmp_path / "cleaned.npz")
    train, test = load_dataset(DataSpec(source="npz", path=str(tmp_path / "cleaned.npz")))
    original_train, original_test = run.datasets()
    keep, labels = plan_arrays(run, plan)
    assert train.ids.tolist() == original_train.ids[keep].tolist() and train.y.tolist() == labels[keep].tolist()
    assert torch.equal(train.x, original_train.x[torch.as_tensor(keep)]) and torch.equal(test.x, original_test.x)
    assert test.y.tolist() == original_test.y.tolist() and train.class_names == original_train.class_names
    assert (tmp_path / "plan.csv").read_bytes().decode() == plan_csv(run, plan)


def test_the_image_folder_export_reads_back_as_the_cleaned_training_set(run, tmp_path):
    plan = a_plan(run)
    export_cleaned(run, plan, "image_folder", tmp_path / "cleaned")
    train, test = load_dataset(DataSpec(source="image_folder", path=str(tmp_path / "cleaned"), test_size=10))
    original_train, _ = run.datasets()
    keep, labels = plan_arrays(run, plan)

    def pairs(images: np.ndarray, classes: list[int]) -> Counter:
        return Counter((image.tobytes(), label) for image, label in zip(images, classes))

    read = (pairs(train.images, [int(train.class_names[c][:3]) for c in train.y])
            + pairs(test.images, [int(test.class_names[c][:3]) for c in test.y]))
    assert read == pairs(original_train.images[keep], labels[keep].tolist())
    assert (tmp_path / "cleaned" / "plan.csv").read_bytes().decode() == plan_csv(run, plan)


# --- the command and the jobs --------------------------------------------------------------------------------------


def test_tdx_clean_prints_the_predicted_and_actual_rows_and_writes_the_cleaned_data(run, workspace, tmp_path):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        main(["clean", run.run_id, "--workspace", str(workspace.root), "--top", "4", "--ranking", "loss", "--no-flags",
              "--method", METHOD, "--retrain", "--seeds", "1", "--out", str(tmp_path / "clean.npz")])
    text = output.getvalue()
    ranking = rank_mislabels(run, "loss")
    train_set, _ = run.datasets()
    suggested = [ranking.suggestion(index, int(train_set.y[index])) is not None for index in ranking.order()[:4]]
    assert f"{sum(suggested)} relabelled, {4 - sum(suggested)} removed, 0 kept" in text
    assert f"predicted ({METHOD}): test accuracy" in text and "actual cleaned" in text and "actual control" in text
    assert "Spearman of the per-query margin changes" in text and (tmp_path / "clean.npz").is_file()


def test_the_jobs_compute_and_load_a_prediction_and_an_experiment(run):
    plan = CleaningPlan(run.run_id, a_plan(run).entries[2:4])  # removals only
    key = store_plan(run, plan)
    experiment = ExperimentSettings(seeds=(0,), keep_run=False)
    for spec in (cleaning_prediction_job(run, key, "kfac"), cleaning_experiment_job(run, key, experiment)):
        assert load_result(run, spec) is None
        job_kind(spec.kind).run(run, spec.params, lambda done, total: None)
        assert load_result(run, spec) is not None


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.badinput
def test_an_empty_plan_is_refused(run):
    with pytest.raises(PlanError, match="changes nothing"):
        check_plan(run, CleaningPlan(run.run_id, ()))
    with pytest.raises(PlanError, match="changes nothing"):
        plan_arrays(run, CleaningPlan(run.run_id, entries((int(run.datasets()[0].ids[0]), "keep"))))


@pytest.mark.badinput
def test_a_plan_naming_examples_the_run_lacks_is_refused(run):
    missing = int(run.datasets()[0].ids.max()) + 1000
    with pytest.raises(PlanError, match=f"example ids \\[{missing}\\].*does not hold"):
        check_plan(run, CleaningPlan(run.run_id, entries((missing, "remove"))))


@pytest.mark.badinput
def test_a_relabel_to_the_class_an_example_has_is_refused(run):
    train_set, _ = run.datasets()
    example, given = int(train_set.ids[0]), int(train_set.y[0])
    with pytest.raises(PlanError, match=f"example {example} is already labelled"):
        check_plan(run, CleaningPlan(run.run_id, entries((example, "relabel", given))))
    with pytest.raises(PlanError, match=f"example {example} is already labelled"):
        make_plan(run, PlanSource(flags=False).edited(example, "relabel", given), {})


@pytest.mark.badinput
def test_a_method_whose_scores_are_no_change_of_the_margin_cannot_predict(run):
    with pytest.raises(SettingsError, match="similarities"):
        predict_effect(run, a_plan(run), "tracin")
    with pytest.raises(SettingsError, match="removals only"):
        predict_effect(run, a_plan(run), "replay")


def recorded_loop(workspace: Workspace) -> Run:
    """A run recorded from a plain loop by the Recorder: tdx cannot call it again."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    with Recorder(workspace, "plain-loop", model=model, factory="mlp", options={"hidden": [8]}, data=DIGITS) as recorder:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in torch.arange(recorder.n_train).split(16):
            loss = F.cross_entropy(model(recorder.train_set.x[batch]), recorder.train_set.y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            recorder.step(optimizer, batch)
    return load_run(workspace, "plain-loop")


@pytest.mark.badinput
def test_a_run_that_cannot_be_retrained_is_refused_before_anything_is_computed(workspace, capsys):
    plain = recorded_loop(workspace)
    with pytest.raises(SettingsError, match="cannot call again"):
        clean_and_retrain(plain, a_plan(plain))
    assert not (plain.directory / "cleaning").exists()
    with pytest.raises(SystemExit):  # refused before a plan is made or a ranking computed
        main(["clean", "plain-loop", "--workspace", str(workspace.root), "--top", "3", "--retrain"])
    assert "cannot call again" in capsys.readouterr().err
    assert not (plain.directory / "cleaning_plans").exists()
