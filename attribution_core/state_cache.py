"""Fitted states kept loaded in this process, so that scoring a new block of queries does not read the state again.

A 60,000-example fit is a few hundred megabytes: read from disk it costs more than the queries' gradients and the
product that score them. Methods only read a state, so one loaded copy per (file, device) is shared by every caller.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .store import Artifact, load_tensors

STATE_CACHE_BYTES = 4 << 30
"""The most bytes of fitted states kept loaded (least recently used dropped beyond it; a larger state is not kept)."""

_state_cache: OrderedDict[tuple[str, int, str], dict[str, torch.Tensor]] = OrderedDict()
_state_cache_lock = threading.Lock()


def _size(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())


def loaded_state(artifact: Artifact, device: torch.device) -> dict[str, torch.Tensor]:
    """A stored fitted state (its state.safetensors) on a device, from the cache when its file is unchanged."""
    path = artifact.path("state.safetensors")
    key = (str(path), path.stat().st_mtime_ns, str(device))
    with _state_cache_lock:
        if key in _state_cache:
            _state_cache.move_to_end(key)
            return _state_cache[key]
    state = {name: tensor.to(device) for name, tensor in load_tensors(path).items()}
    with _state_cache_lock:
        _state_cache[key] = state
        while len(_state_cache) > 1 and sum(_size(cached) for cached in _state_cache.values()) > STATE_CACHE_BYTES:
            _state_cache.popitem(last=False)
        if _size(state) > STATE_CACHE_BYTES:
            _state_cache.pop(key, None)
    return state
