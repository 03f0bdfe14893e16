"""The Recorder: a hand-written PyTorch loop becomes a run that every method opens, and bad input gets a clear message."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attribution_core.api import attribute
from attribution_core.data import DataSpec, load_dataset
from attribution_core.errors import SettingsError, UnknownRunError, WorkspaceError
from attribution_core.methods import METHODS
from attribution_core.models import ModelSpec
from attribution_core.runs.record import RECORD_DIR, TrainingRecord
from attribution_core.runs.recorder import (
    INCOMPLETE_MARKER,
    INITIAL_WEIGHTS,
    ArrayData,
    Recorder,
    RecorderSettings,
    describe_incomplete,
    factory_name,
    list_incomplete,
)
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.threads import is_small, one_thread
from attribution_core.runs.training import train
from attribution_core.store import Workspace, load_tensors

ROOT = Path(__file__).resolve().parent.parent
DIGITS = DataSpec(source="digits", test_size=60, max_train=120)
STAGE = Stage(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=32)
RECIPE = Recipe((STAGE,), seed=0, checkpoints=CheckpointPolicy(every_epochs=1))
SMALL = {"trak": {"k": 64}, "source": {"n_segments": 1}}
"""Settings that keep each method quick on these runs (SOURCE: the runs have 2 checkpoints, fewer than its 3 segments)."""


def digits_mlp(input_shape: tuple[int, ...], n_classes: int, hidden: int = 32) -> nn.Module:
    """The user's own factory: a one-hidden-layer MLP (found again by name, as factory_name gives it)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


FACTORY = factory_name(digits_mlp)


def hand_written_loop(recorder: Recorder, model: nn.Module, stage: Stage, seed: int) -> None:
    """attribution_core.runs.training.fit_model's loop for one stage, written out as a user would, recording every step."""
    x, y = recorder.train_set.x, recorder.train_set.y
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    steps_per_epoch = math.ceil(len(x) / stage.batch_size)
    with one_thread(is_small(model)):  # as fit_model: float sums independent of the thread count
        model.train()
        for _ in range(stage.epochs):
            permutation = torch.randperm(len(x), generator=order)
            for number in range(steps_per_epoch):
                batch = permutation[number * stage.batch_size : (number + 1) * stage.batch_size]
                optimizer.zero_grad(set_to_none=True)
                logits = model(x[batch])
                losses = F.cross_entropy(logits, y[batch], reduction="none")
                losses.mean().backward()
                optimizer.step()
                recorder.step(optimizer, batch, losses=losses)
            recorder.checkpoint()


def fresh_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    """The factory's model initialised from the seed, as fit_model does."""
    torch.manual_seed(seed)
    return digits_mlp((1, 8, 8), 10, hidden)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("recorder_ws"))


@pytest.fixture(scope="module")
def trained(workspace) -> Run:
    """The same recipe trained by tdx's trainer."""
    return train(DIGITS, ModelSpec(FACTORY, {"hidden": 32}), RECIPE, workspace, "trained")


@pytest.fixture(scope="module")
def recorded(workspace) -> Run:
    """The recipe's loop written by hand and recorded."""
    model = fresh_model(RECIPE.seed)
    with Recorder(workspace, "recorded", model=model, factory=digits_mlp, options={"hidden": 32}, data=DIGITS, seed=RECIPE.seed,
                  settings=RecorderSettings(margins_from_losses=True)) as recorder:  # cross-entropy losses, as the trainer's
        hand_written_loop(recorder, model, STAGE, RECIPE.seed)
    return load_run(workspace, "recorded")


# --- the same run as tdx's trainer --------------------------------------------------------------------------------


def test_a_hand_written_loop_records_the_same_run_as_tdx_trainer(trained, recorded):
    for name in ("stage", "lr", "momentum", "beta2", "weight_decay", "batch_size", "indices", "losses", "margins"):
        assert np.array_equal(getattr(recorded.record, name), getattr(trained.record, name)), name
    assert recorded.record.optimizer == trained.record.optimizer
    assert recorded.trajectory == trained.trajectory
    assert recorded.checkpoints == trained.checkpoints  # steps, stages, epochs, test accuracies and file checksums
    for info in trained.checkpoints:
        mine, theirs = (load_tensors(run.directory / "checkpoints" / info.file) for run in (recorded, trained))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)
    for name in ("test_accuracy", "train_accuracy", "n_train", "n_test", "n_parameters"):
        assert recorded.metrics[name] == trained.metrics[name], name
    assert recorded.metrics["origin"] == "recorded" and "origin" not in trained.metrics
    assert recorded.model == trained.model and recorded.data == trained.data


@pytest.mark.parametrize("method", ["trak", "tracin"])
def test_a_recorded_run_gets_the_same_scores_as_the_trained_one(trained, recorded, method):
    mine = attribute(recorded, method, queries=[0, 1, 2], settings=SMALL.get(method), device="cpu")
    theirs = attribute(trained, method, queries=[0, 1, 2], settings=SMALL.get(method), device="cpu")
    np.testing.assert_allclose(mine.values, theirs.values, rtol=1e-6, atol=0)
    assert mine.notes == theirs.notes  # both have a record: no approximation note


def test_the_recipe_describes_the_loop_and_the_run_is_listed_complete(workspace, recorded):
    (stage,) = recorded.recipe.stages
    assert (stage.name, stage.epochs, stage.optimizer, stage.lr, stage.momentum, stage.batch_size, stage.transform) == (
        "train", 2, "sgd", 0.1, 0.9, 32, "none")
    assert recorded.recipe.checkpoints.count == len(recorded.checkpoints) == 2
    assert "recorded" in workspace.run_ids() and "recorded" not in list_incomplete(workspace)
    assert not (recorded.directory / INCOMPLETE_MARKER).exists()
    initial = load_tensors(recorded.directory / INITIAL_WEIGHTS)  # the weights before step 1, for replay
    assert all(torch.equal(initial[name], value) for name, value in fresh_model(RECIPE.seed).state_dict().items())


# --- every method opens a recorded run ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_attributes_the_recorded_run(recorded, method):
    if METHODS[method].unsupported_reason(recorded) is not None:
        pytest.skip(METHODS[method].unsupported_reason(recorded))
    scores = attribute(recorded, method, queries=[0, 1], settings=SMALL.get(method), device="cpu")
    assert scores.values.shape == (2, len(recorded.datasets()[0])) and np.isfinite(scores.values).all()


# --- stages and in-memory data ------------------------------------------------------------------------------------


def test_named_stages_keep_each_stage_end_and_in_memory_data_is_stored_with_the_run(tmp_path):
    train_set, test_set = load_dataset(DIGITS)
    arrays = ArrayData(train_set.x.numpy(), train_set.y.numpy(), test_set.x.numpy(), test_set.y.numpy(), class_names=train_set.class_names)
    model = fresh_model()
    with Recorder(tmp_path, "staged", model=model, factory=FACTORY, data=arrays) as recorder:
        recorder.stage("pretrain")  # before any step: names the first stage
        hand_written_loop(recorder, model, Stage(epochs=1, lr=0.1, batch_size=40), seed=0)
        recorder.stage("finetune")
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for batch in torch.arange(len(train_set)).split(50):
            optimizer.zero_grad()
            F.cross_entropy(model(recorder.train_set.x[batch]), recorder.train_set.y[batch]).backward()
            optimizer.step()
            recorder.step(optimizer, batch, margins=torch.full((len(batch),), 0.5))  # no losses: recorded as NaN
    run = load_run(tmp_path, "staged")
    assert [stage.name for stage in run.recipe.stages] == ["pretrain", "finetune"]
    assert [stage.optimizer for stage in run.recipe.stages] == ["sgd", "adam"]
    assert [(info.step, info.stage) for info in run.checkpoints] == [(3, 0), (6, 1)]  # the end of each stage
    finetune = run.record.stage.repeat(run.record.batch_size) == 1
    assert np.isnan(run.record.losses[finetune]).all() and (run.record.margins[finetune] == 0.5).all()
    assert np.isfinite(run.record.losses[~finetune]).all() and np.isnan(run.record.margins[~finetune]).all()
    assert run.data.source == "npz" and Path(run.data.path) == run.directory / "data.npz"
    stored_train, stored_test = run.datasets()
    assert torch.equal(stored_train.x, train_set.x) and torch.equal(stored_test.y, test_set.y)
    assert stored_train.class_names == train_set.class_names
    assert attribute(run, "source", queries=[0], settings={"n_segments": 2}, device="cpu").segment_values.shape[0] == 2


# --- bad input: a clear message, nothing half written ------------------------------------------------------------


def open_recorder(root: Path, run_id: str = "bad", **overrides) -> tuple[Recorder, nn.Module, torch.optim.Optimizer]:
    model = overrides.pop("model", None) or fresh_model()
    recorder = Recorder(root, run_id, model=model, factory=FACTORY, data=DIGITS, **overrides)
    return recorder, model, torch.optim.SGD(model.parameters(), lr=0.1)


def one_step(recorder: Recorder, model: nn.Module, optimizer: torch.optim.Optimizer, rows: list[int]) -> torch.Tensor:
    optimizer.zero_grad()
    losses = F.cross_entropy(model(recorder.train_set.x[rows]), recorder.train_set.y[rows], reduction="none")
    losses.mean().backward()
    optimizer.step()
    return losses


def assert_stopped(root: Path, run_id: str, steps: int, checkpoints: int, error: str) -> None:
    """The run lists as incomplete, not as a run, and holds what was recorded up to the stop."""
    workspace = Workspace(root)
    assert run_id not in workspace.run_ids() and list_incomplete(workspace) == [run_id]
    with pytest.raises(UnknownRunError):
        load_run(workspace, run_id)
    directory = workspace.run_dir(run_id, must_exist=False)
    record = TrainingRecord.load(directory / RECORD_DIR)
    assert (record.n_steps if record else 0) == steps
    assert len(list((directory / "checkpoints").glob("*.safetensors"))) == checkpoints
    marker = json.loads((directory / INCOMPLETE_MARKER).read_text())
    assert marker["status"] == "stopped" and error in marker["error"]
    assert error in describe_incomplete(workspace, run_id) and "record it again" in describe_incomplete(workspace, run_id)


@pytest.mark.badinput
def test_an_index_outside_the_training_set_is_named_with_the_valid_range(tmp_path):
    with pytest.raises(SettingsError, match=r"step 2\): index 120 is not a row of the training set \(valid: 0\.\.119, 120 examples"):
        with open_recorder(tmp_path)[0] as recorder:
            recorder.step(torch.optim.SGD(recorder.model.parameters(), lr=0.1), [0, 1])
            recorder.step(torch.optim.SGD(recorder.model.parameters(), lr=0.1), [3, 120, -1])
    assert_stopped(tmp_path, "bad", steps=1, checkpoints=0, error="index 120")


@pytest.mark.badinput
@pytest.mark.parametrize("values, message", [
    (torch.ones(3), r"4 indices but 3 losses; give one value per example"),
    (torch.tensor(0.7), r"4 indices but 1 losses \(the loss with reduction='mean'\? use reduction='none'"),
])
def test_losses_that_do_not_match_the_batch_are_refused(tmp_path, values, message):
    recorder, model, optimizer = open_recorder(tmp_path)
    with pytest.raises(SettingsError, match=message), recorder:
        recorder.step(optimizer, [0, 1, 2, 3], losses=values)
    assert_stopped(tmp_path, "bad", steps=0, checkpoints=0, error="losses")


@pytest.mark.badinput
@pytest.mark.parametrize("indices, message", [
    (torch.tensor([0.0, 1.0]), "indices must be integer rows of the training set, got torch.float32"),
    ([], "the batch is empty"),
])
def test_indices_that_are_not_rows_are_refused(tmp_path, indices, message):
    recorder, _, optimizer = open_recorder(tmp_path)
    with pytest.raises(SettingsError, match=message):
        recorder.step(optimizer, indices)
    recorder.abort("test over")


@pytest.mark.badinput
def test_a_model_that_does_not_match_its_factory_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(SettingsError, match=r"parameter '1\.weight' has shape \[16, 64\] where factory .*builds \[32, 64\]"):
        Recorder(tmp_path, "mismatch", model=fresh_model(hidden=16), factory=FACTORY, data=DIGITS)
    with pytest.raises(SettingsError,
                       match=r"factory 'mlp' has parameter '3\.weight' \[10, 128\] that the model passed to the Recorder lacks"):
        Recorder(tmp_path, "mismatch", model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), factory="mlp", data=DIGITS)
    wrapped = nn.Module()
    wrapped.module = fresh_model()
    with pytest.raises(SettingsError, match=r"starts with 'module\.'; pass the unwrapped model, model\.module"):
        Recorder(tmp_path, "mismatch", model=wrapped, factory=FACTORY, data=DIGITS)
    assert not (tmp_path / "runs" / "mismatch").exists() and list_incomplete(tmp_path) == []


@pytest.mark.badinput
def test_a_factory_that_cannot_be_found_again_is_refused(tmp_path):
    def local_factory(input_shape, n_classes):
        return digits_mlp(input_shape, n_classes)

    for factory in (local_factory, "no_such_builtin"):
        with pytest.raises(SettingsError, match="factory"):
            Recorder(tmp_path, "unfindable", model=fresh_model(), factory=factory, data=DIGITS)
    with pytest.raises(SettingsError, match="cannot import factory"):
        Recorder(tmp_path, "unfindable", model=fresh_model(), factory="no_such_package.models:mlp", data=DIGITS)


@pytest.mark.badinput
def test_a_loop_that_raises_leaves_an_incomplete_run_with_its_checkpoints_and_can_be_recorded_again(tmp_path):
    recorder, model, optimizer = open_recorder(tmp_path, "crashed")
    with pytest.raises(RuntimeError, match="out of memory"), recorder:
        for step in range(5):
            recorder.step(optimizer, [step, step + 1], losses=one_step(recorder, model, optimizer, [step, step + 1]))
            if step == 2:
                recorder.checkpoint()
        raise RuntimeError("CUDA out of memory")
    assert_stopped(tmp_path, "crashed", steps=5, checkpoints=1, error="RuntimeError: CUDA out of memory")
    with pytest.raises(SettingsError, match="closed"):
        recorder.step(optimizer, [0])
    recorder, model, optimizer = open_recorder(tmp_path, "crashed")  # the same id again: a fresh record
    with recorder:
        recorder.step(optimizer, [0, 1], losses=one_step(recorder, model, optimizer, [0, 1]))
    run = load_run(tmp_path, "crashed")
    assert run.record.n_steps == 1 and len(run.checkpoints) == 1 and list_incomplete(tmp_path) == []


@pytest.mark.badinput
def test_a_killed_process_leaves_an_incomplete_run_never_a_broken_one(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from torch.nn import functional as F
        from attribution_core.data import DataSpec
        from attribution_core.models import mlp
        from attribution_core.runs.recorder import Recorder, RecorderSettings
        model = mlp((1, 8, 8), 10, hidden=(8,))
        recorder = Recorder({str(tmp_path)!r}, "killed", model=model, factory="mlp", options={{"hidden": [8]}},
                            data=DataSpec(source="digits", test_size=60, max_train=120), settings=RecorderSettings(flush_every=2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(7):
            losses = F.cross_entropy(model(recorder.train_set.x[[step]]), recorder.train_set.y[[step]], reduction="none")
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            recorder.step(optimizer, [step], losses=losses)
            if step == 3:
                recorder.checkpoint()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    workspace = Workspace(tmp_path)
    assert workspace.run_ids() == [] and list_incomplete(workspace) == ["killed"]
    directory = workspace.run_dir("killed", must_exist=False)
    assert TrainingRecord.load(directory / RECORD_DIR).n_steps == 6  # whole chunks of 2 steps: the 7th was pending
    assert len(load_tensors(directory / "checkpoints" / "ckpt_0000.safetensors")) == 4
    marker = json.loads((directory / INCOMPLETE_MARKER).read_text())
    assert (marker["status"], marker["steps"], marker["checkpoints"]) == ("recording", 4, 1)
    assert "still recording, or killed" in describe_incomplete(workspace, "killed")


@pytest.mark.badinput
def test_a_complete_run_is_not_replaced_unless_asked_and_an_empty_loop_is_not_a_run(tmp_path):
    recorder, model, optimizer = open_recorder(tmp_path, "twice")
    with recorder:
        recorder.step(optimizer, [0], losses=one_step(recorder, model, optimizer, [0]))
    with pytest.raises(WorkspaceError, match="exists already.*overwrite=True"):
        open_recorder(tmp_path, "twice")
    recorder, model, optimizer = open_recorder(tmp_path, "twice", settings=RecorderSettings(overwrite=True))
    assert Workspace(tmp_path).run_ids() == [] and list_incomplete(tmp_path) == ["twice"]  # replaced: recording again
    with recorder:
        for rows in ([0, 1], [2, 3]):
            recorder.step(optimizer, rows, losses=one_step(recorder, model, optimizer, rows))
    assert load_run(tmp_path, "twice").record.n_steps == 2
    with pytest.raises(SettingsError, match="no optimizer step was recorded"), open_recorder(tmp_path, "empty")[0]:
        pass
    assert list_incomplete(tmp_path) == ["empty"]
