"""The workspace store: atomic writes, safe loading, content keys, run lookup."""
from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution_core.errors import CheckpointError, UnknownRunError, WorkspaceError
from attribution_core.store import (
    Artifact,
    Workspace,
    atomic_save_npy,
    atomic_write_bytes,
    check_name,
    compute_once_across_ranks,
    content_key,
    load_npy,
    load_tensors,
    mapped_zeros,
    save_tensors,
)


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_mapped_zeros_are_writable_float32_zeros_whose_file_is_already_gone(tmp_path):
    tensor = mapped_zeros(tmp_path / "scratch", (3, 4))
    assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.zeros(3, 4))
    tensor[1] = 2.0
    assert tensor.sum().item() == 8.0
    assert list((tmp_path / "scratch").iterdir()) == []
    assert mapped_zeros(tmp_path, (0, 4)).shape == (0, 4)


def test_killed_writer_leaves_the_old_version_intact(tmp_path):
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"old version")
    writer = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from attribution_core import store
        real_write = store.os.fdopen
        def slow_fdopen(*args, **kwargs):
            handle = real_write(*args, **kwargs)
            original = handle.write
            def write(data):
                for start in range(0, len(data), 1 << 16):
                    original(data[start:start + (1 << 16)])
                    if start == 1 << 20:
                        print("writing", flush=True)
                        import time; time.sleep(30)
                return len(data)
            handle.write = write
            return handle
        store.os.fdopen = slow_fdopen
        store.atomic_write_bytes(Path({str(target)!r}), b"x" * (8 << 20))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.read_bytes() == b"old version"


def test_safetensors_round_trip(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])


class LeavesAMark:
    """A pickle payload that, if ever unpickled, creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.badinput
def test_pickle_checkpoint_is_refused_without_loading(tmp_path):
    path, marker = tmp_path / "model.pt", tmp_path / "unpickled"
    path.write_bytes(pickle.dumps({"w": LeavesAMark(marker)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: only .safetensors files are loaded")) as info:
        load_tensors(path)
    assert "convert it with safetensors.torch.save_file" in str(info.value)
    assert not marker.exists()


@pytest.mark.badinput
def test_pickle_renamed_to_safetensors_is_refused_without_loading(tmp_path):
    path, marker = tmp_path / "model.safetensors", tmp_path / "unpickled"
    path.write_bytes(pickle.dumps({"w": LeavesAMark(marker)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a valid safetensors file")):
        load_tensors(path)
    assert not marker.exists()


@pytest.mark.badinput
@pytest.mark.parametrize("damage", ["truncated", "corrupt header", "empty"])
def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path, damage):
    path = tmp_path / "ckpt.safetensors"
    save_tensors(path, {"w": torch.ones(100, 100)})
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:500], "corrupt header": data[:8] + b"}" * 16 + data[24:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a valid safetensors file")) as info:
        load_tensors(path)
    assert str(info.value).endswith("it may be truncated or corrupt; restore it from a copy or train the run again")


@pytest.mark.badinput
@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b", "..", "", ".hidden"],
                         ids=["../evil", "/etc/passwd", "a/b", "..", "empty name", ".hidden"])
def test_names_that_leave_the_workspace_are_rejected(name):
    with pytest.raises(WorkspaceError, match=re.escape(f"invalid name {name!r}: use letters, digits, '.', '_' and '-' only")):
        check_name(name)


@pytest.mark.badinput
@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute"])
def test_run_id_or_file_name_that_leaves_the_workspace_is_refused_before_anything_is_written(tmp_path, name):
    workspace = Workspace(tmp_path / "workspace")
    with pytest.raises(WorkspaceError, match=re.escape(f"invalid run id {name!r}")):
        workspace.run_dir(name, must_exist=False)
    with pytest.raises(WorkspaceError, match=re.escape(f"invalid file name {name!r}")):
        atomic_save_npy(Artifact(tmp_path / "workspace" / "scores" / "abc").path(name), np.ones(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.badinput
def test_unknown_run_lists_existing_runs(tmp_path):
    workspace = Workspace(tmp_path)
    (tmp_path / "runs" / "real-run").mkdir(parents=True)
    (tmp_path / "runs" / "real-run" / "run.json").write_text("{}")
    with pytest.raises(UnknownRunError, match=re.escape(f"no run 'missing' in workspace {tmp_path}; runs: real-run")):
        workspace.run_dir("missing")


def test_npy_round_trip_refuses_object_arrays(tmp_path):
    atomic_save_npy(tmp_path / "a.npy", np.arange(5))
    assert load_npy(tmp_path / "a.npy").tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WorkspaceError, match="obj.npy"):
        load_npy(tmp_path / "obj.npy")


def test_content_key_depends_on_every_input():
    base = {"method": "trak", "k": 1024}
    assert content_key(base) == content_key(dict(reversed(base.items())))
    assert content_key(base) != content_key({**base, "k": 512})


def test_artifact_is_complete_only_after_commit_and_detects_tampering(tmp_path):
    artifact = Artifact(tmp_path / "scores" / "abc")
    atomic_save_npy(artifact.path("scores.npy"), np.ones(3))
    assert not artifact.is_complete()
    artifact.commit({"method": "x"})
    assert artifact.is_complete() and artifact.verify()
    data = bytearray(artifact.path("scores.npy").read_bytes())
    data[-1] ^= 0xFF
    artifact.path("scores.npy").write_bytes(bytes(data))
    assert artifact.is_complete() and not artifact.verify()


@pytest.mark.badinput
def test_disk_full_is_reported_and_old_file_kept(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WorkspaceError, match=re.escape(f"disk full while writing {target}: free space and run again")):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.badinput
def test_read_only_workspace_is_reported(tmp_path, monkeypatch):
    # Simulated: CI runs as root, which ignores directory permissions.
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(WorkspaceError, match=re.escape(f"cannot write {tmp_path / 'x'}: the workspace is read-only; pass a writable")):
        atomic_write_bytes(tmp_path / "x", b"1")
    assert list(tmp_path.iterdir()) == []


def _complete(directory: Path, content: bytes) -> Artifact:
    """A complete artifact in directory holding one file with this content."""
    artifact = Artifact(directory, {"made": "here"})
    atomic_write_bytes(artifact.path("data.bin"), content)
    artifact.commit(artifact.inputs)
    return artifact


def test_an_artifact_of_a_renamed_kind_is_moved_to_the_new_name_under_its_key(tmp_path):
    workspace = Workspace(tmp_path)
    run_dir = workspace.run_dir("r", must_exist=False)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    key = content_key({"method": "m"})
    _complete(run_dir / "features" / key, b"fitted")
    partial = run_dir / "states" / key
    partial.mkdir(parents=True)
    (partial / "half.bin").write_bytes(b"an interrupted computation")
    moved = workspace.artifact("r", "states", {"method": "m"})
    assert moved.directory == partial and moved.is_complete() and moved.path("data.bin").read_bytes() == b"fitted"
    assert not (run_dir / "features" / key).exists() and not moved.path("half.bin").exists()
    other = content_key({"method": "n"})
    _complete(run_dir / "features" / other, b"left alone")
    assert not workspace.artifact("r", "scores", {"method": "n"}).is_complete(), "scores had no former name"
    assert (run_dir / "features" / other).is_dir()


def test_a_complete_artifact_is_kept_and_an_incomplete_former_one_is_not_adopted(tmp_path):
    current = _complete(tmp_path / "states" / "k", b"current")
    former = _complete(tmp_path / "features" / "k", b"former")
    assert not current.adopt(former.directory) and current.path("data.bin").read_bytes() == b"current"
    fresh = Artifact(tmp_path / "states" / "j")
    incomplete = tmp_path / "features" / "j"
    incomplete.mkdir()
    (incomplete / "data.bin").write_bytes(b"no manifest")
    assert not fresh.adopt(incomplete) and incomplete.is_dir() and not fresh.directory.exists()


def test_without_a_process_group_an_artifact_computed_across_ranks_is_computed_once_here(tmp_path):
    computed = []

    def compute() -> bytes:
        computed.append(1)
        return b"result"

    artifact = Artifact(tmp_path / "a", {"made": "here"})
    for _ in range(2):
        compute_once_across_ranks(artifact, compute, lambda stored, result: atomic_write_bytes(stored.path("r.bin"), result))
    assert computed == [1] and artifact.verify() and artifact.path("r.bin").read_bytes() == b"result"
