"""The training record: every step's batch, hyperparameters and per-example losses, written as training goes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attribution_core.data import DataSpec, load_dataset
from attribution_core.errors import DataError
from attribution_core.models import ModelSpec
from attribution_core.numerics.segments import step_weights
from attribution_core.runs.record import RECORD_DIR, RecordWriter, TrainingRecord
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import fit_model, train
from attribution_core.store import Workspace, atomic_write_json
from attribution_core.task import correct_class_margin

DIGITS = DataSpec(source="digits", test_size=100, split_seed=0, max_train=240)
TWO_STAGES = Recipe(
    (Stage(name="pretrain", epochs=2, lr=0.1, batch_size=50),
     Stage(name="finetune", epochs=2, lr=0.02, batch_size=32, classes=(0, 1, 2, 3, 4), transform="rotate", optimizer="adam", momentum=0.8)),
    seed=1, checkpoints=CheckpointPolicy(every_epochs=1),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(DIGITS, ModelSpec("mlp", {"hidden": [16]}), TWO_STAGES, Workspace(tmp_path_factory.mktemp("ws")), "recorded")


def test_every_epoch_of_a_stage_draws_each_of_its_examples_once(run):
    train_set, _ = run.datasets()
    record, labels = run.record, train_set.y.numpy()
    for stage_index, stage in enumerate(TWO_STAGES.stages):
        members = np.flatnonzero(stage.members(labels))
        steps = np.flatnonzero(record.stage == stage_index) + 1
        per_epoch = np.array_split(steps, stage.epochs)
        for epoch_steps in per_epoch:
            drawn = np.concatenate([record.batch(step) for step in epoch_steps])
            assert sorted(drawn.tolist()) == members.tolist()


def test_step_hyperparameters_are_the_optimizers(run):
    record = run.record
    assert record.n_steps == run.trajectory.n_steps
    np.testing.assert_allclose(record.lr, run.trajectory.lr)
    stage_two = record.stage == 1
    assert set(np.array(record.optimizer)[stage_two]) == {"adam"} and set(np.array(record.optimizer)[~stage_two]) == {"sgd"}
    assert np.all(record.momentum[stage_two] == 0.8) and np.all(record.beta2[stage_two] == 0.999)
    assert np.all(record.momentum[~stage_two] == 0.9) and np.all(record.beta2[~stage_two] == 0.0)
    assert np.all(record.weight_decay == 1e-4)


def test_recorded_losses_are_those_of_the_checkpoint_before_each_step(run):
    """The first step after each checkpoint was taken from the checkpoint's weights, on its stage's view of the inputs."""
    train_set, _ = run.datasets()
    record = run.record
    for index, info in enumerate(run.checkpoints[:-1]):
        step = info.step + 1
        rows = record.batch(step)
        x = run.train_view(int(record.stage[step - 1]))[rows]
        with torch.no_grad():
            logits = run.load_model(index)(x)
        first, last = record.offsets[step - 1], record.offsets[step]
        np.testing.assert_allclose(record.losses[first:last], F.cross_entropy(logits, train_set.y[rows], reduction="none"), atol=1e-5)
        np.testing.assert_allclose(record.margins[first:last], correct_class_margin(logits, train_set.y[rows]), atol=1e-5)


def test_run_json_stays_small_and_the_record_costs_twelve_bytes_per_example_step(run):
    payload = json.loads((run.directory / "run.json").read_text())
    assert "trajectory" not in payload and payload["record"]["example_steps"] == len(run.record.indices)
    record_bytes = sum(part.stat().st_size for part in (run.directory / RECORD_DIR).iterdir())
    per_example_step = 12  # one int32 index and two float32 (loss, margin)
    per_step = 4 * 3 + 8 * 4  # stage, batch size, optimizer; lr, momentum, beta2, weight decay
    overhead_per_file = 2048  # safetensors' JSON header
    files = len(list((run.directory / RECORD_DIR).iterdir()))
    assert record_bytes <= per_example_step * len(run.record.indices) + per_step * run.record.n_steps + overhead_per_file * files


def _hand_record() -> TrainingRecord:
    """Three steps over 4 examples: batches [0, 1], [2, 2, 3], [1]; lr 1, 2, 3."""
    return TrainingRecord(
        stage=np.array([0, 0, 1]), lr=np.array([1.0, 2.0, 3.0]), momentum=np.zeros(3), beta2=np.zeros(3), weight_decay=np.zeros(3),
        batch_size=np.array([2, 3, 1]), optimizer=["sgd"] * 3, indices=np.array([0, 1, 2, 2, 3, 1]),
        losses=np.full(6, np.nan, dtype=np.float32), margins=np.full(6, np.nan, dtype=np.float32),
    )


def test_draw_weights_are_each_examples_share_of_the_steps_by_hand():
    record = _hand_record()
    # steps 1..2, weights = lr: example 0: 1/2, 1: 1/2, 2: 2·2/3, 3: 2/3; total lr 3; times N = 4
    expected = 4 * np.array([0.5, 0.5, 4 / 3, 2 / 3]) / 3
    np.testing.assert_allclose(record.draw_weights(1, 2, 4, step_weights=record.lr), expected)
    np.testing.assert_allclose(record.draw_weights(3, 3, 4), [0, 4, 0, 0])  # only example 1, by itself
    assert record.draw_weights(1, 3, 4, record.lr).mean() == pytest.approx(1)
    np.testing.assert_array_equal(record.batch(2), [2, 2, 3])


@pytest.mark.badinput
def test_draw_weights_outside_the_recorded_steps_are_refused():
    with pytest.raises(DataError, match="steps 2..4 are not within the record's 1..3"):
        _hand_record().draw_weights(2, 4, 4)


def test_a_killed_training_leaves_a_valid_prefix_of_whole_chunks(tmp_path):
    train_set = load_dataset(DIGITS)[0]
    writer = RecordWriter(tmp_path / RECORD_DIR, flush_every=3)

    def stop_before_step_eight(stage_index, batch):
        if writer.steps_written + len(writer._pending) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_model(train_set, ModelSpec("mlp", {"hidden": [4]}), TWO_STAGES, record=writer, on_batch=stop_before_step_eight)
    record = TrainingRecord.load(tmp_path / RECORD_DIR)
    # Steps 1-5 were flushed at the first checkpoint (an epoch of 240 / 50); 6 and 7 were pending: lost, not half written.
    assert record.n_steps == 5 and len(record.indices) == record.batch_size.sum() == 240
    assert not list((tmp_path / RECORD_DIR).glob(".*"))  # no temporary file left behind


def test_runs_made_before_records_existed_still_open_and_draw_weights_follow_the_recipe(run, tmp_path):
    """An older run.json holds the trajectory and no record: the stage's classes decide who was trained on."""
    import shutil

    root = tmp_path / "old"
    shutil.copytree(run.workspace.root, root)
    directory = root / "runs" / "recorded"
    payload = json.loads((directory / "run.json").read_text())
    payload.pop("record")
    payload["trajectory"] = {"stage": run.trajectory.stage, "lr": run.trajectory.lr, "momentum": run.trajectory.momentum,
                             "batch_size": run.trajectory.batch_size, "optimizer": run.trajectory.optimizer}
    atomic_write_json(directory / "run.json", payload)
    shutil.rmtree(directory / RECORD_DIR)
    old = load_run(root, "recorded")
    assert old.record is None and old.trajectory == run.trajectory
    train_set, _ = old.datasets()
    members = TWO_STAGES.stages[1].members(train_set.y.numpy())
    weights = old.checkpoint_weights(3)  # a stage-2 checkpoint: its classes share the stretch evenly
    np.testing.assert_allclose(weights[members], len(train_set) / members.sum())
    assert np.all(weights[~members] == 0)


@pytest.mark.badinput
def test_a_run_whose_record_went_missing_says_so(run, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(run.workspace.root, root)
    shutil.rmtree(root / "runs" / "recorded" / RECORD_DIR)
    with pytest.raises(DataError, match="its training record \\(record/\\) is missing or incomplete"):
        load_run(root, "recorded")


def test_draw_weights_of_a_run_count_each_step_by_its_lr_over_one_minus_momentum(run):
    train_set, _ = run.datasets()
    record, n = run.record, len(train_set)
    weights = step_weights(record.lr, np.where(np.array(record.optimizer) == "sgd", record.momentum, 0), record.optimizer)
    first, last = run.checkpoints[1].step + 1, run.checkpoints[2].step
    expected = np.zeros(n)
    for step in range(first, last + 1):
        for row in record.batch(step):
            expected[row] += weights[step - 1] / len(record.batch(step))
    expected *= n / weights[first - 1 : last].sum()
    np.testing.assert_allclose(run.checkpoint_weights(2), expected, rtol=1e-10)
