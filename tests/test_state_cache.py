"""Fitted states kept loaded in the process: one copy per file and device, reloaded when the file changes, bounded in bytes."""
from __future__ import annotations

import os

import torch

from attribution_core import state_cache
from attribution_core.state_cache import loaded_state
from attribution_core.store import Artifact, save_tensors


def stored_state(directory, values: list[float]) -> Artifact:
    """A complete artifact holding a state.safetensors of one tensor."""
    artifact = Artifact(directory, {"state": str(directory)})
    save_tensors(artifact.path("state.safetensors"), {"w": torch.tensor(values)})
    artifact.commit(artifact.inputs)
    return artifact


def test_a_state_is_loaded_once_and_again_when_its_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(state_cache, "_state_cache", type(state_cache._state_cache)())
    artifact = stored_state(tmp_path / "a", [1.0, 2.0])
    first = loaded_state(artifact, torch.device("cpu"))
    assert loaded_state(artifact, torch.device("cpu")) is first, "the same file: the loaded copy"
    refitted = stored_state(tmp_path / "a", [3.0, 4.0]).path("state.safetensors")  # refitted under the same key
    later = refitted.stat().st_mtime_ns + 10**9
    os.utime(refitted, ns=(later, later))  # a newer file whatever the file system's time resolution
    assert loaded_state(artifact, torch.device("cpu"))["w"].tolist() == [3.0, 4.0]


def test_the_cache_keeps_at_most_its_budget_dropping_the_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(state_cache, "_state_cache", type(state_cache._state_cache)())
    monkeypatch.setattr(state_cache, "STATE_CACHE_BYTES", 3 * 4 * 4)  # three states of four float32 values
    artifacts = [stored_state(tmp_path / str(number), [float(number)] * 4) for number in range(4)]
    loaded = [loaded_state(artifact, torch.device("cpu")) for artifact in artifacts[:3]]
    loaded_state(artifacts[0], torch.device("cpu"))  # used again: now the most recent
    loaded_state(artifacts[3], torch.device("cpu"))  # over budget: the least recently used (1) goes
    assert loaded_state(artifacts[0], torch.device("cpu")) is loaded[0] and loaded_state(artifacts[2], torch.device("cpu")) is loaded[2]
    assert loaded_state(artifacts[1], torch.device("cpu")) is not loaded[1]
    huge = stored_state(tmp_path / "huge", [0.0] * 13)  # larger than the whole budget: loaded, never kept
    assert loaded_state(huge, torch.device("cpu")) is not loaded_state(huge, torch.device("cpu"))
