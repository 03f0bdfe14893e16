"""Training records what the optimizer did, is reproducible, and retrain drops masked examples."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from attribution_core.cli import main as tdx
from attribution_core.data import DataSpec, load_dataset
from attribution_core.errors import CheckpointError, SettingsError, WorkspaceError
from attribution_core.models import ModelSpec, build_model
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import fit_model, retrain, train
from attribution_core.store import Workspace, save_tensors

DIGITS = DataSpec(source="digits", test_size=360, split_seed=0, max_train=300)
SMALL_MLP = ModelSpec("mlp", {"hidden": [16]})
TWO_STAGES = Recipe(
    (
        Stage(name="pretrain", epochs=2, lr=0.1, batch_size=50, schedule="cosine", warmup_steps=3),
        Stage(name="finetune", epochs=2, lr=0.02, batch_size=40, schedule="step", step_epochs=1, step_gamma=0.5, classes=(0, 1, 2)),
    ),
    seed=3,
    checkpoints=CheckpointPolicy(every_epochs=1),
)


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset(DIGITS)[0]


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    return train(DIGITS, SMALL_MLP, TWO_STAGES, Workspace(tmp_path_factory.mktemp("ws")), "two-stage")


def test_same_seed_and_recipe_give_bit_identical_weights(digits_train):
    first = fit_model(digits_train, SMALL_MLP, TWO_STAGES).model.state_dict()
    second = fit_model(digits_train, SMALL_MLP, TWO_STAGES).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    other_seed = fit_model(digits_train, SMALL_MLP, TWO_STAGES, seed=4).model.state_dict()
    assert not torch.equal(first["1.weight"], other_seed["1.weight"])


def _expected_learning_rates(n_first: int, n_second: int) -> list[float]:
    """The schedule written out by hand: cosine with 3 warm-up steps, then a halving step schedule."""
    steps_first, steps_second = math.ceil(n_first / 50), math.ceil(n_second / 40)
    rates = []
    for step in range(2 * steps_first):
        rate = 0.1 * 0.5 * (1 + math.cos(math.pi * step / (2 * steps_first)))
        rates.append(rate * (step + 1) / 3 if step < 3 else rate)
    rates += [0.02 * 0.5 ** (step // steps_second) for step in range(2 * steps_second)]
    return rates


def test_trajectory_holds_the_learning_rate_the_optimizer_used_at_every_step(two_stage_run, digits_train, monkeypatch):
    used = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    fit_model(digits_train, SMALL_MLP, TWO_STAGES)
    n_second = int(np.isin(digits_train.y.numpy(), [0, 1, 2]).sum())
    expected = _expected_learning_rates(len(digits_train), n_second)
    assert np.allclose(two_stage_run.trajectory.lr, expected)
    assert np.allclose(used, expected)
    assert two_stage_run.trajectory.stage == [0] * (len(expected) - 2 * math.ceil(n_second / 40)) + [1] * (2 * math.ceil(n_second / 40))
    assert set(two_stage_run.trajectory.momentum) == {0.9}


def test_run_json_and_safetensors_checkpoints_are_written(two_stage_run):
    directory = two_stage_run.directory
    payload = json.loads((directory / "run.json").read_text())
    assert payload["record"]["steps"] == two_stage_run.trajectory.n_steps and "trajectory" not in payload  # the record holds it
    assert [info["epoch"] for info in payload["checkpoints"]] == [1, 2, 1, 2]
    assert [info["stage"] for info in payload["checkpoints"]] == [0, 0, 1, 1]
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == [f"ckpt_{i:04d}.safetensors" for i in range(4)]
    reloaded = load_run(two_stage_run.workspace, "two-stage")
    assert reloaded.trajectory == two_stage_run.trajectory and reloaded.recipe == TWO_STAGES


def test_evenly_spaced_checkpoints_include_every_stage_end(digits_train):
    recipe = Recipe(TWO_STAGES.stages, seed=0, checkpoints=CheckpointPolicy(every_epochs=None, count=3))
    result = fit_model(digits_train, SMALL_MLP, recipe)
    steps = [info.step for info, _ in result.checkpoints]
    stage_end = sum(1 for stage in result.trajectory.stage if stage == 0)
    assert stage_end in steps and result.trajectory.n_steps in steps and len(steps) >= 3


def test_retrain_drops_masked_examples_from_every_stage(digits_train):
    keep = np.ones(len(digits_train), dtype=bool)
    keep[::3] = False
    seen = {0: set(), 1: set()}
    fit_model(digits_train, SMALL_MLP, TWO_STAGES, keep_mask=keep, on_batch=lambda stage, idx: seen[stage].update(idx.tolist()))
    dropped = set(np.flatnonzero(~keep).tolist())
    assert seen[0] and seen[1]
    assert not (seen[0] | seen[1]) & dropped
    assert seen[0] == set(np.flatnonzero(keep).tolist())


def test_retrain_with_everything_kept_reproduces_the_run(two_stage_run):
    model = retrain(two_stage_run, np.ones(len(two_stage_run.datasets()[0]), dtype=bool))
    final = two_stage_run.load_model(-1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))


@pytest.mark.badinput
def test_checkpoint_with_wrong_shapes_is_refused(two_stage_run, tmp_path):
    wrong = build_model(ModelSpec("mlp", {"hidden": [8]}), (1, 8, 8), 10).state_dict()
    path = two_stage_run.directory / "checkpoints" / two_stage_run.checkpoints[0].file
    original = path.read_bytes()
    try:
        save_tensors(path, wrong)
        expected = (f"{path} does not fit model mlp {{'hidden': [16]}}: restore the checkpoint this run trained, "
                    "or train the run again (Error(s) in loading")
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            two_stage_run.load_model(0)
    finally:
        path.write_bytes(original)


@pytest.mark.badinput
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["NaN", "Inf"])
def test_checkpoint_with_nan_or_inf_weights_is_refused(two_stage_run, value):
    path = two_stage_run.directory / "checkpoints" / two_stage_run.checkpoints[1].file
    original = path.read_bytes()
    state = two_stage_run.load_model(1).state_dict()
    state["1.weight"][0, 0] = value
    try:
        save_tensors(path, state)
        message = f"{path} holds NaN or Inf weights: the run diverged; retrain with a lower learning rate"
        with pytest.raises(CheckpointError, match=re.escape(message)):
            two_stage_run.load_model(1)
    finally:
        path.write_bytes(original)


@pytest.mark.badinput
def test_bad_recipe_values_name_the_field():
    with pytest.raises(SettingsError, match="lr=-1"):
        Stage(lr=-1)
    with pytest.raises(SettingsError, match="exactly one"):
        CheckpointPolicy(every_epochs=1, count=3)


@pytest.mark.badinput
def test_stage_with_no_examples_left_is_reported(digits_train):
    recipe = Recipe((Stage(epochs=1, classes=(42,)),))
    with pytest.raises(SettingsError, match=re.escape("stage 'train' has no training examples left (classes=(42,)); choose classes")):
        fit_model(digits_train, SMALL_MLP, recipe)


def test_cli_demo_then_runs_json_lists_four_runs_with_their_records(tmp_path, capsys):
    tdx(["demo", "--workspace", str(tmp_path), "--tiny"])
    capsys.readouterr()
    tdx(["runs", "--workspace", str(tmp_path), "--json"])
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 4
    for run in runs:
        assert run["record"]["steps"] == run["n_steps"] > 0
        assert all(info["file"].endswith(".safetensors") for info in run["checkpoints"])
    assert [s["name"] for s in next(r for r in runs if r["id"] == "fmnist-two-stage")["recipe"]["stages"]] == ["pretrain", "finetune"]


@pytest.mark.badinput
def test_cli_run_id_that_leaves_the_workspace_is_a_clear_error_and_writes_nothing(tmp_path, capsys, record_property):
    (tmp_path / "workspace" / "runs").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        tdx(["train", "../escape", "--workspace", str(tmp_path / "workspace"), "--data", "digits", "--epochs", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    record_property("user_sees", error.strip())
    assert error == "tdx: error: invalid run id '../escape': use letters, digits, '.', '_' and '-' only (no paths, no '..')\n"
    assert [str(path.relative_to(tmp_path)) for path in sorted(tmp_path.rglob("*"))] == ["workspace", "workspace/runs"]


@pytest.mark.badinput
def test_training_into_a_read_only_workspace_is_reported_and_leaves_no_run(tmp_path, monkeypatch):
    # Simulated: CI runs as root, which ignores directory permissions.
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    workspace = Workspace(tmp_path)
    first_file = tmp_path / "runs" / "ro" / "incomplete.json"  # the marker that says a run is being trained, written first
    with pytest.raises(WorkspaceError,
                       match=re.escape(f"cannot write {first_file}: the workspace is read-only; pass a writable --workspace")):
        train(DIGITS, SMALL_MLP, Recipe((Stage(epochs=1),)), workspace, "ro")
    assert workspace.run_ids() == [] and not any(path.is_file() for path in tmp_path.rglob("*"))


def test_run_json_records_checkpoint_checksums_that_verify(two_stage_run):
    assert all(len(info.sha256) == 64 and info.size > 0 for info in two_stage_run.checkpoints)
    assert two_stage_run.verify() == []


@pytest.mark.badinput
def test_a_modified_checkpoint_fails_verification(two_stage_run, record_property):
    path = two_stage_run.directory / "checkpoints" / two_stage_run.checkpoints[2].file
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-4] + b"\0\0\0\0")
        problems = two_stage_run.verify()
        record_property("user_sees", "; ".join(problems))
        assert problems == [f"checkpoint {path} does not match the checksum recorded in run.json: restore it or train the run again"]
    finally:
        path.write_bytes(original)
