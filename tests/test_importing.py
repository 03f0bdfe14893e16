"""Importing finished checkpoints: a run that opens in the methods, and bad input refused before anything is written."""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attribution_core.api import RECORDLESS_NOTE, attribute
from attribution_core.data import DataSpec
from attribution_core.errors import CheckpointError, SettingsError, WorkspaceError
from attribution_core.models import ModelSpec
from attribution_core.runs.importing import add_import_command, import_run
from attribution_core.runs.recorder import factory_name, list_incomplete
from attribution_core.runs.run import CheckpointPolicy, Recipe, Run, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import Workspace, file_sha256, load_tensors, save_tensors

DIGITS = DataSpec(source="digits", test_size=60, max_train=120)
RECIPE = Recipe((Stage(epochs=2, lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=30),), seed=0,
                checkpoints=CheckpointPolicy(every_epochs=1))


def digits_mlp(input_shape: tuple[int, ...], n_classes: int, hidden: int = 32) -> nn.Module:
    """The user's own factory."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


FACTORY = factory_name(digits_mlp)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    return train(DIGITS, ModelSpec(FACTORY, {"hidden": 32}), RECIPE, Workspace(tmp_path_factory.mktemp("source_ws")), "original")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The trained run's checkpoints in a folder of their own, as a user's training script left them."""
    folder = tmp_path_factory.mktemp("exported")
    for info in trained.checkpoints:
        shutil.copy(trained.directory / "checkpoints" / info.file, folder / f"epoch_{info.epoch}.safetensors")
    return folder


@pytest.fixture(scope="module")
def imported(trained, exported, tmp_path_factory) -> Run:
    workspace = Workspace(tmp_path_factory.mktemp("import_ws"))
    import_run(workspace, "imported", model=FACTORY, options={"hidden": 32}, checkpoints=f"{exported}/*.safetensors",
               data=DIGITS, learning_rates=[0.1])
    return load_run(workspace, "imported")


def test_an_imported_run_holds_the_checkpoints_with_their_steps_and_says_it_is_approximate(trained, imported):
    assert imported.workspace.run_ids() == ["imported"] and list_incomplete(imported.workspace) == []
    assert [info.sha256 for info in imported.checkpoints] == [info.sha256 for info in trained.checkpoints]  # byte copies
    assert [info.step for info in imported.checkpoints] == [info.step for info in trained.checkpoints]  # from the files' metadata
    assert [info.test_accuracy for info in imported.checkpoints] == [info.test_accuracy for info in trained.checkpoints]
    assert imported.record is None and imported.trajectory.lr == trained.trajectory.lr  # constant 0.1, one per step
    assert imported.metrics["origin"] == "imported" and imported.metrics["imported_steps"] == "metadata"
    assert imported.metrics["test_accuracy"] == trained.metrics["test_accuracy"]
    assert imported.model == trained.model and imported.data == trained.data


@pytest.mark.parametrize("method, settings", [("trak", {"k": 64}), ("tracin", None), ("ekfac", None)])
def test_an_imported_run_attributes_as_the_run_it_came_from(trained, imported, method, settings):
    mine = attribute(imported, method, queries=[0, 1, 2], settings=settings, device="cpu")
    theirs = attribute(trained, method, queries=[0, 1, 2], settings=settings, device="cpu")
    # the same weights, data and learning rates; every epoch drew each example once, so TracIn's even weights are exact here
    np.testing.assert_allclose(mine.values, theirs.values, rtol=1e-5, atol=1e-7)
    assert RECORDLESS_NOTE in mine.notes


def test_checkpoints_without_metadata_or_learning_rates_get_pseudo_steps_in_natural_name_order(trained, tmp_path):
    folder = tmp_path / "plain"
    states = [load_tensors(trained.directory / "checkpoints" / info.file) for info in trained.checkpoints]
    for name, state in zip(("weights_2", "weights_10"), states):  # 2 before 10, though "weights_10" < "weights_2"
        save_tensors(folder / f"{name}.safetensors", state)  # no "step" metadata
    run = import_run(tmp_path / "ws", "plain", model=FACTORY, options={"hidden": 32}, checkpoints=str(folder / "*.safetensors"),
                     data=DIGITS)
    assert [info.step for info in run.checkpoints] == [1, 2] and run.trajectory.lr == [1.0, 1.0]
    assert run.metrics["imported_steps"] == "pseudo" and run.metrics["imported_learning_rates"] == "equal (none given)"
    last = load_run(tmp_path / "ws", "plain").load_model(-1).state_dict()
    assert all(torch.equal(last[name], states[1][name]) for name in last)
    scores = attribute(load_run(tmp_path / "ws", "plain"), "tracin", queries=[0], device="cpu")
    assert np.isfinite(scores.values).all()


@pytest.mark.badinput
def test_a_pickle_checkpoint_is_refused_with_the_conversion_hint_and_nothing_is_written(exported, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(exported / "epoch_1.safetensors", folder / "epoch_1.safetensors")
    (folder / "epoch_2.pt").write_bytes(b"a pickle, never opened")
    for checkpoints in (str(folder / "*"), [folder / "epoch_1.safetensors", folder / "epoch_2.pt"]):
        with pytest.raises(CheckpointError,
                           match=r"epoch_2\.pt: only \.safetensors files are loaded .*convert it with safetensors\.torch\.save_file"):
            import_run(tmp_path / "ws", "pickled", model=FACTORY, options={"hidden": 32}, checkpoints=checkpoints, data=DIGITS)
    assert not (tmp_path / "ws" / "runs" / "pickled").exists()


@pytest.mark.badinput
def test_a_truncated_checkpoint_is_refused_as_corrupt_and_nothing_is_written(exported, tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    shutil.copy(exported / "epoch_1.safetensors", folder / "epoch_1.safetensors")
    (folder / "epoch_2.safetensors").write_bytes((exported / "epoch_2.safetensors").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"epoch_2\.safetensors is not a valid safetensors file .*truncated or corrupt"):
        import_run(tmp_path / "ws", "truncated", model=FACTORY, options={"hidden": 32}, checkpoints=str(folder / "*"), data=DIGITS)
    assert not (tmp_path / "ws" / "runs" / "truncated").exists()


@pytest.mark.badinput
def test_a_checkpoint_of_another_shape_is_named_with_the_parameter(exported, tmp_path):
    with pytest.raises(SettingsError, match=r"checkpoint .*epoch_1\.safetensors does not match "
                                            r".*parameter '1\.weight' has shape \[32, 64\] "
                                            r"where factory .* builds \[16, 64\]"):
        import_run(tmp_path, "narrow", model=FACTORY, options={"hidden": 16}, checkpoints=f"{exported}/*.safetensors", data=DIGITS)
    assert not (tmp_path / "runs" / "narrow").exists()


@pytest.mark.badinput
def test_a_pattern_matching_nothing_says_what_the_folder_holds(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no file matches .*\*\.safetensors.*the folder .*ckpts holds model\.pt"):
        import_run(tmp_path, "none", model=FACTORY, checkpoints=str(tmp_path / "ckpts" / "*.safetensors"), data=DIGITS)
    with pytest.raises(CheckpointError, match="empty or missing"):
        import_run(tmp_path, "none", model=FACTORY, checkpoints=str(tmp_path / "nowhere" / "*.safetensors"), data=DIGITS)


@pytest.mark.badinput
def test_learning_rates_and_steps_must_fit_the_checkpoints_and_a_run_is_not_replaced_unless_asked(exported, imported, tmp_path):
    common = {"model": FACTORY, "options": {"hidden": 32}, "checkpoints": f"{exported}/*.safetensors", "data": DIGITS}
    with pytest.raises(SettingsError, match="3 learning rates for 2 checkpoints"):
        import_run(tmp_path, "run", learning_rates=[0.1, 0.1, 0.1], **common)
    with pytest.raises(SettingsError, match="learning rates must be positive"):
        import_run(tmp_path, "run", learning_rates=[0.1, -1.0], **common)
    with pytest.raises(SettingsError, match="strictly increasing"):
        import_run(tmp_path, "run", steps=[8, 4], **common)
    with pytest.raises(WorkspaceError, match="exists already"):
        import_run(imported.workspace, "imported", **common)
    assert import_run(imported.workspace, "imported", overwrite=True, steps=[10, 20], **common).checkpoints[-1].step == 20
    assert not (tmp_path / "runs").exists()


def test_the_import_command(exported, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tdx")
    add_import_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import", "cli-run", "--workspace", str(tmp_path), "--model", FACTORY, "--options", '{"hidden": 32}',
                              "--checkpoints", f"{exported}/*.safetensors", "--data", "digits", "--test-size", "60",
                              "--max-train", "120", "--lr", "0.1"])
    args.handler(args)
    assert "imported run cli-run: 2 checkpoints" in capsys.readouterr().out
    run = load_run(tmp_path, "cli-run")
    assert run.data == DIGITS and run.trajectory.lr[0] == 0.1
    files = sorted(exported.glob("*.safetensors"))  # an unquoted pattern reaches the command as the files themselves
    args = parser.parse_args(["import", "cli-files", "--workspace", str(tmp_path), "--model", FACTORY, "--options", '{"hidden": 32}',
                              "--checkpoints", *map(str, files), "--data", "digits", "--test-size", "60", "--max-train", "120"])
    args.handler(args)
    assert [info.sha256 for info in load_run(tmp_path, "cli-files").checkpoints] == [file_sha256(path) for path in files]
    with pytest.raises(SettingsError, match="--options .* is not JSON"):
        bad = parser.parse_args(["import", "x", "--model", FACTORY, "--options", "{hidden: 32}", "--checkpoints", "a.safetensors",
                                 "--data", "digits"])
        bad.handler(bad)
