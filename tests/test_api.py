"""The front door: every method through attribute(), stored and reused, recomputed when inputs change."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from attribution_core import api
from attribution_core.annotations import Annotations
from attribution_core.api import METHODS, QueryBatch, attribute, self_influence
from attribution_core.cli import main as tdx
from attribution_core.data import DataSpec
from attribution_core.errors import SettingsError, WorkspaceError
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.models import ModelSpec
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import FORMAT_VERSION, Workspace, atomic_write_json, content_key, load_tensors, save_tensors
from attribution_core.task import Task

SMALL_TRAK = {"k": 64}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small two-stage digits run with four checkpoints."""
    recipe = Recipe(
        (Stage(name="pretrain", epochs=2, lr=0.05), Stage(name="finetune", epochs=2, lr=0.02, classes=(0, 1, 2, 3, 4))),
        checkpoints=CheckpointPolicy(every_epochs=1),
    )
    data = DataSpec(source="digits", test_size=100, max_train=200)
    return train(data, ModelSpec("mlp", {"hidden": [16]}), recipe, Workspace(tmp_path_factory.mktemp("ws")), "digits-two-stage")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_scores_queries_against_the_whole_training_set(run, method):
    settings = {"n_segments": 2} if method == "source" else SMALL_TRAK if method == "trak" else None
    scores = attribute(run, method, queries=[0, 5, 7], settings=settings, device="cpu")
    assert scores.values.shape == (3, 200)
    assert np.isfinite(scores.values).all()
    assert scores.query_names == ["test 0", "test 5", "test 7"]
    assert scores.checkpoints == api.default_checkpoints(run, method)


def test_stored_state_and_scores_are_reused(run, monkeypatch):
    first = attribute(run, "trak", queries=[1, 2], settings=SMALL_TRAK, device="cpu")

    def refit(*args, **kwargs):
        raise AssertionError("train-side state was recomputed")

    monkeypatch.setattr(Trak, "fit", refit)
    monkeypatch.setattr(Trak, "score", refit)
    again = attribute(run, "trak", queries=[1, 2], settings=SMALL_TRAK, device="cpu")
    np.testing.assert_array_equal(first.values, again.values)
    with pytest.raises(AssertionError, match="recomputed"):
        attribute(run, "trak", queries=[1, 2], settings={"k": 32}, device="cpu")


def test_other_checkpoints_give_another_key(run):
    last = attribute(run, "trak", queries=[1], settings=SMALL_TRAK, checkpoints=[3], device="cpu")
    first = attribute(run, "trak", queries=[1], settings=SMALL_TRAK, checkpoints=[0], device="cpu")
    assert last.key != first.key and not np.allclose(last.values, first.values)


def test_a_query_outside_the_data_set_scores_like_the_same_test_example(run):
    _, test_set = run.datasets()
    by_index = attribute(run, "trak", queries=[4], settings=SMALL_TRAK, device="cpu")
    uploaded = attribute(run, "trak", queries=QueryBatch(test_set.x[4:5], test_set.y[4:5], ["upload"]), settings=SMALL_TRAK, device="cpu")
    np.testing.assert_allclose(uploaded.values, by_index.values, rtol=1e-5, atol=1e-6)
    assert uploaded.query_indices is None and uploaded.key == ""


def test_self_influence_is_the_diagonal_of_scores_of_training_examples(run):
    train_set, _ = run.datasets()
    values = self_influence(run, "trak", settings=SMALL_TRAK, device="cpu")
    as_queries = attribute(run, "trak", queries=QueryBatch(train_set.x[:10], train_set.y[:10], [str(i) for i in range(10)]),
                           settings=SMALL_TRAK, device="cpu")
    np.testing.assert_allclose(values[:10], np.diag(as_queries.values[:, :10]), rtol=1e-4, atol=1e-6)
    assert attribute(run, "trak", queries=[0], settings=SMALL_TRAK, device="cpu").self_influence is not None


def test_source_segments_follow_the_stages_and_sum_to_the_scores(run):
    scores = attribute(run, "source", queries=[0, 1], settings={"n_segments": 2}, device="cpu")
    assert scores.segment_values.shape == (2, 2, 200)
    np.testing.assert_allclose(scores.segment_values.sum(axis=0), scores.values, rtol=1e-5, atol=1e-7)
    late = scores.restricted_to_segments([1])
    np.testing.assert_allclose(late.values, scores.segment_values[1])


@pytest.mark.badinput
def test_unknown_method_lists_the_known_ones(run):
    with pytest.raises(SettingsError, match="trak, source"):
        attribute(run, "magic")


@pytest.mark.badinput
def test_checkpoints_out_of_range_are_reported(run):
    with pytest.raises(SettingsError, match="checkpoints 0..3"):
        attribute(run, "trak", checkpoints=[7])


@pytest.mark.badinput
def test_query_index_out_of_range_is_reported(run):
    with pytest.raises(SettingsError, match="0..99"):
        attribute(run, "trak", queries=[100], settings=SMALL_TRAK)


@pytest.mark.badinput
def test_unknown_setting_is_named(run):
    with pytest.raises(SettingsError, match="unknown settings \\['kk'\\]; known settings: k, "):
        attribute(run, "trak", settings={"kk": 3})


def state_of(run, settings: dict):
    """The stored state of TRAK with these settings at its default checkpoints."""
    return api.state_artifact(run, Trak(settings), api.default_checkpoints(run, "trak"), Task())


@pytest.mark.badinput
def test_a_state_stored_by_an_older_format_version_is_recomputed_not_misread(run, monkeypatch, record_property):
    settings = {"k": 40}
    first = api.prepare(run, "trak", settings=settings, device="cpu")
    artifact = state_of(run, settings)
    # What an older version left under the same key: a state in another layout, its manifest one format back.
    save_tensors(artifact.path("state.safetensors"), {"old_layout": torch.zeros(3)})
    atomic_write_json(artifact.manifest_path, {**artifact.manifest(), "format": FORMAT_VERSION - 1})
    fits, real_fit = [], Trak.fit
    monkeypatch.setattr(Trak, "fit", lambda self, inputs: fits.append(1) or real_fit(self, inputs))
    again = api.prepare(run, "trak", settings=settings, device="cpu")
    assert fits == [1] and again.state_key == first.state_key
    assert set(again.state) == set(first.state) and all(torch.equal(again.state[n], first.state[n]) for n in first.state)
    assert artifact.manifest()["format"] == FORMAT_VERSION and artifact.verify()
    record_property("user_sees", "no error: the older state is recomputed (a progress bar shows the work) and replaced")


@pytest.mark.badinput
def test_disk_full_while_storing_a_state_is_reported_and_nothing_is_half_written(run, monkeypatch):
    settings = {"k": 48}
    artifact = state_of(run, settings)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    message = f"disk full while writing {artifact.path('state.safetensors')}: free space and run again (nothing was changed)"
    with pytest.raises(WorkspaceError, match=re.escape(message)):
        attribute(run, "trak", queries=[0], settings=settings, device="cpu")
    assert not artifact.is_complete() and list(artifact.directory.iterdir()) == []
    monkeypatch.undo()
    assert attribute(run, "trak", queries=[0], settings=settings, device="cpu").values.shape == (1, 200)
    assert artifact.verify()


def test_a_state_stored_under_the_former_kind_features_is_moved_and_reused_not_refitted(run, monkeypatch):
    settings = {"k": 24}
    first = attribute(run, "trak", queries=[3], settings=settings, device="cpu")
    key = state_of(run, settings).directory.name
    former = run.directory / "features" / key
    former.parent.mkdir(exist_ok=True)
    (run.directory / "states" / key).rename(former)  # the layout of a workspace made before the rename

    def refit(*args, **kwargs):
        raise AssertionError("train-side state was recomputed")

    monkeypatch.setattr(Trak, "fit", refit)
    monkeypatch.setattr(Trak, "score", refit)
    found = api.stored_scores(run, "trak", queries=[3], settings=settings)  # what a page asks on every click
    assert found is not None and not former.exists() and (run.directory / "states" / key).is_dir()
    again = attribute(run, "trak", queries=[3], settings=settings, device="cpu")
    np.testing.assert_array_equal(again.values, first.values)
    assert again.key == first.key and state_of(run, settings).directory.name == key and state_of(run, settings).verify()


def test_a_states_key_hashes_the_inputs_it_hashed_under_its_former_kind(run):
    """Renaming the kind changed no key: stored states, and the scores keyed by them, stay found."""
    inputs = {"run": run.run_id, "created": run.created, "method": "trak", "settings": dataclasses.asdict(Trak(SMALL_TRAK).settings),
              "version": TrakSettings.state_version, "checkpoints": [0, 1, 2, 3], "task": Task().key()}  # TRAK: the last five
    artifact = state_of(run, SMALL_TRAK)
    assert artifact.directory == run.directory / "states" / content_key(inputs)


SLOW_FIT = """
import sys, time
from attribution_core import api
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.runs.run import load_run
real_fit = Trak.fit
def slow_fit(self, inputs):
    print("computing", flush=True)
    time.sleep(2)  # holds the lock while the test's own call arrives
    return real_fit(self, inputs)
Trak.fit = slow_fit
api.prepare(load_run(sys.argv[1], sys.argv[2]), "trak", settings={"k": 56}, device="cpu")
print("stored", flush=True)
"""


@pytest.mark.badinput
def test_two_processes_computing_the_same_state_at_once_compute_it_once(run, monkeypatch, record_property):
    other = subprocess.Popen([sys.executable, "-c", SLOW_FIT, str(run.workspace.root), run.run_id], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "computing"

        def must_not_fit(self, inputs):
            raise AssertionError("the state was computed twice")

        monkeypatch.setattr(Trak, "fit", must_not_fit)
        mine = api.prepare(run, "trak", settings={"k": 56}, device="cpu")  # waits for the other process, then reuses
        assert other.wait(timeout=300) == 0 and other.stdout.read().strip() == "stored"
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    stored = load_tensors(state_of(run, {"k": 56}).path("state.safetensors"))
    assert all(torch.equal(mine.state[name], stored[name]) for name in stored) and state_of(run, {"k": 56}).verify()
    record_property("user_sees", "no error: the second process waits for the first, then reuses its stored state")


@pytest.mark.badinput
def test_a_workspace_path_with_spaces_and_non_ascii_characters_works(tmp_path, capsys, record_property):
    root = tmp_path / "my wörk späce ✓ 数据"
    data, model = DataSpec(source="digits", test_size=50, max_train=60), ModelSpec("mlp", {"hidden": [8]})
    train(data, model, Recipe((Stage(epochs=1),)), Workspace(root), "spaced")
    run_here = load_run(root, "spaced")
    scores = attribute(run_here, "graddot", queries=[0, 1], device="cpu")
    assert scores.values.shape == (2, 60) and np.isfinite(scores.values).all()
    assert np.array_equal(attribute(load_run(root, "spaced"), "graddot", queries=[0, 1], device="cpu").values, scores.values)
    Annotations(Workspace(root).annotations_path).set_flag("spaced", 3, "outlier", note="ünïcode ✓")
    assert Annotations(root / "annotations.sqlite").flags("spaced")[3].note == "ünïcode ✓"
    tdx(["runs", "--workspace", str(root), "--json"])
    assert [entry["id"] for entry in json.loads(capsys.readouterr().out)] == ["spaced"]
    assert run_here.verify() == [] and Workspace(root).root == root.resolve()
    record_property("user_sees", f"no error: training, scores, flags and the CLI all work in {root.name!r}")


def test_cli_attribute_prints_proponents_and_opponents(run, capsys):
    tdx(["attribute", run.run_id, "--workspace", str(run.workspace.root), "--method", "graddot", "--queries", "0-2", "--top", "2"])
    out = capsys.readouterr().out
    assert "graddot: 3 queries x 200 training examples" in out
    assert out.count("proponents:") == 3 and out.count("opponents:") == 3


@pytest.mark.parametrize(("cuda", "expected"), [(True, torch.device("cuda")), (False, torch.device("cpu"))])
def test_auto_device_is_cuda_exactly_when_cuda_is_available(monkeypatch, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert api.resolve_device("auto") == api.resolve_device() == expected


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize(("device", "named"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), (torch.device("cpu"), "cpu"),
                                               (torch.device("cuda", 0), "cuda:0")])
def test_a_device_named_explicitly_is_kept_whatever_is_available(monkeypatch, cuda, device, named):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert str(api.resolve_device(device)) == named
