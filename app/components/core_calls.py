"""Cached calls into the attribution core, and how their errors reach the page.

Runs and small tables use Streamlit's caches. Scores are remembered in a process-wide store
keyed by workspace, run (id and creation time), method and checkpoints: a Streamlit cache
would replay the progress bar drawn while computing, so the progress bar is drawn here, outside
any cached function, and only on a miss. The core also stores every score on disk, so a
restart recomputes nothing either.
"""
from __future__ import annotations

import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import streamlit as st
import torch

from attribution_core import inspection
from attribution_core.annotations import Annotations
from attribution_core.api import METHODS, attribute, default_checkpoints
from attribution_core.errors import TdxError
from attribution_core.run import Run, load_run
from attribution_core.scores import Scores
from attribution_core.store import Workspace

from .context import current_run_id, workspace_root
from .progress import progress_bar

T = TypeVar("T")

_REMEMBERED_RESULTS = 48
"""How many computed results (scores, rankings, embeddings) the process keeps in memory."""


def call_or_report(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """call(*args, **kwargs), or None after showing why it failed; the rest of the page goes on.

    Errors the core raises on purpose (TdxError: bad input, missing checkpoint, ...) appear as
    their message; anything else as a traceback, because that is a bug to report.
    """
    try:
        return call(*args, **kwargs)
    except TdxError as exc:
        st.error(str(exc), icon=":material/error:")
    except Exception as exc:  # noqa: BLE001 (a core bug must not take the whole page down)
        st.error(f"Internal error: {type(exc).__name__}: {exc}", icon=":material/bug_report:")
        with st.expander("Traceback"):
            st.code("".join(traceback.format_exception(exc)))
    return None


def workspace() -> Workspace:
    """The app's workspace."""
    return Workspace(workspace_root())


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_run(root: str, run_id: str, modified: float) -> Run:
    return load_run(Workspace(root), run_id)


def load_run_cached(run_id: str) -> Run:
    """The run (one object per process, so its datasets load once); reloaded when its run.json changes."""
    space = workspace()
    run_file = space.run_dir(run_id) / "run.json"
    return _cached_run(str(space.root), run_id, run_file.stat().st_mtime)


def require_run() -> Run:
    """The current run with its datasets loaded; stops the page with a plain message when there is none."""
    run_id = current_run_id()
    if run_id is None:
        st.info("This workspace has no runs yet: train one on the Runs page, or build the demo with `tdx demo`.")
        st.stop()
    run = call_or_report(load_run_cached, run_id)
    if run is None or call_or_report(run.datasets) is None:
        st.stop()
    return run


def list_runs_cached() -> list[Run]:
    """Every run of the workspace."""
    return [load_run_cached(run_id) for run_id in workspace().run_ids()]


@st.cache_resource(show_spinner=False)
def _annotations(path: str) -> Annotations:
    return Annotations(path)


def annotations() -> Annotations:
    """The workspace's flags store (annotations.sqlite)."""
    return _annotations(str(workspace().annotations_path))


class _Results:
    """Computed results shared by every session of the server, with the locks that keep them whole."""

    def __init__(self) -> None:
        self.values: OrderedDict = OrderedDict()
        self.lock = threading.Lock()  # guards values and key_locks
        self.key_locks: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple) -> tuple[bool, Any]:
        """(found, value), marking a found key as recently used."""
        with self.lock:
            if key not in self.values:
                return False, None
            self.values.move_to_end(key)
            return True, self.values[key]


@st.cache_resource(show_spinner=False)
def _results() -> _Results:
    return _Results()


def remembered(key: tuple, compute: Callable[[], T]) -> T:
    """compute() once per key for the whole server process (least recently used dropped).

    Sessions asking for the same missing key at once wait for the first one's computation.
    """
    results = _results()
    found, value = results.get(key)
    if found:
        return value
    with results.lock:
        key_lock = results.key_locks.setdefault(key, threading.Lock())
    with key_lock:
        found, value = results.get(key)
        if found:
            return value
        value = compute()
        with results.lock:
            results.values[key] = value
            while len(results.values) > _REMEMBERED_RESULTS:
                results.values.popitem(last=False)
            results.key_locks.pop(key, None)
    return value


def run_key(run: Run) -> tuple[str, str, str]:
    """What identifies a run's results: workspace, id and creation time (a retrained id differs)."""
    return str(run.workspace.root), run.run_id, run.created


def test_predictions(run: Run) -> pd.DataFrame:
    """The final model on the test set: one row per test index with true, predicted, confidence, correct."""

    def compute() -> pd.DataFrame:
        _, test_set = run.datasets()
        probabilities = inspection.predict(run, split="test")
        predicted = probabilities.argmax(axis=1)
        true = test_set.y.numpy()
        return pd.DataFrame({
            "index": np.arange(len(true)),
            "true": true,
            "predicted": predicted,
            "confidence": probabilities.max(axis=1),
            "correct": predicted == true,
        })

    return remembered(("predictions", *run_key(run)), compute)


def predict(run: Run, x: torch.Tensor) -> tuple[int, float]:
    """(predicted class, its probability) of the final model for one input x: (1, ...)."""
    probabilities = inspection.predict(run, x)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def method_label(method: str) -> str:
    """How a method is named on the page (TRAK, SOURCE, ...): its declared label."""
    return METHODS[method].label


def method_choices(run: Run) -> list[str]:
    """The methods the app offers for this run, in the core's display order: those that can attribute it."""
    return [name for name, method in METHODS.items() if method.unsupported_reason(run) is None]


def unsupported_methods(run: Run) -> dict[str, str]:
    """The methods that cannot attribute this run: name -> the core's reason."""
    reasons = {name: method.unsupported_reason(run) for name, method in METHODS.items()}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def default_checkpoint_range(run: Run, method: str) -> tuple[int, int]:
    """(first, last) of the checkpoints the method uses by default."""
    chosen = default_checkpoints(run, method)
    return chosen[0], chosen[-1]


def scores(run: Run, method: str, checkpoints: tuple[int, ...]) -> Scores:
    """Scores of every test sample under a method and checkpoints, with a progress bar on a miss."""

    def compute() -> Scores:
        with progress_bar(f"{method_label(method)}: scoring the test set against the training set") as progress:
            return attribute(run, method, queries=None, checkpoints=list(checkpoints), progress=progress)

    return remembered(("scores", *run_key(run), method, tuple(checkpoints)), compute)
