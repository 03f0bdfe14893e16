"""Cached calls into the attribution core, and how their errors reach the page.

Runs and small tables use Streamlit's caches. Scores are computed on demand, in fixed blocks of
QUERY_BLOCK test samples: a page that shows test sample q asks for the block holding q, never
for the whole test set (that stays a CLI/API job: `tdx attribute`, `tdx lds`). A block is
remembered in a process-wide store keyed by workspace, run (id and creation time), method,
checkpoints and block; a Streamlit cache would replay the progress bar drawn while computing, so
the progress bar is drawn here, outside any cached function, and only on a miss. The core stores
the scores of every list of test indices on disk (api.attribute), so a revisited block, or one
computed before a restart, is loaded rather than computed again.
"""
from __future__ import annotations

import dataclasses
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
from attribution_core.api import METHODS, attribute, default_checkpoints, state_artifact
from attribution_core.errors import TdxError
from attribution_core.run import Run, load_run
from attribution_core.scores import Scores
from attribution_core.store import Workspace
from attribution_core.task import Task

from .context import current_run_id, workspace_root
from .progress import ProgressFn, progress_bar

T = TypeVar("T")

_REMEMBERED_RESULTS = 48
"""How many computed results (score blocks, rankings, embeddings) the process keeps in memory."""

_REMEMBERED_BLOCKS = 16
"""How many of those may be blocks of scores (each QUERY_BLOCK × training set floats, ~8 MB for 60,000 examples)."""

QUERY_BLOCK = 32
"""Test samples scored together: block b holds test indices [b × QUERY_BLOCK, (b + 1) × QUERY_BLOCK).

Asking for one test sample scores its whole block (the neighbours come almost free: replay
carries up to 32 queries backward in one replay, influence streams the training set once per
block), and the block's scores are stored by the core under the block's indices, so any sample
of a block visited before opens at once.
"""

SCORES = "scores"
"""The first element of the store keys of score blocks."""


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
            blocks = [stored for stored in results.values if stored[:1] == (SCORES,)]
            for stored in blocks[: max(0, len(blocks) - _REMEMBERED_BLOCKS)]:  # oldest first
                del results.values[stored]
            results.key_locks.pop(key, None)
    return value


def is_remembered(key: tuple) -> bool:
    """Whether the process holds a result under this key (without marking it used)."""
    results = _results()
    with results.lock:
        return key in results.values


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


def query_block(query: int, n_test: int) -> tuple[int, ...]:
    """The block of test indices scored together with `query` (see QUERY_BLOCK), cut at the end of the test set."""
    start = query // QUERY_BLOCK * QUERY_BLOCK
    return tuple(range(start, min(start + QUERY_BLOCK, n_test)))


def blocks_covering(n_queries: int, n_test: int) -> list[tuple[int, ...]]:
    """The blocks that hold the first n_queries test samples (the last one may reach past them)."""
    return [query_block(start, n_test) for start in range(0, min(n_queries, n_test), QUERY_BLOCK)]


def _block_key(run: Run, method: str, checkpoints: tuple[int, ...], block: tuple[int, ...]) -> tuple:
    return (SCORES, *run_key(run), method, tuple(checkpoints), tuple(block))


def block_scores(run: Run, method: str, checkpoints: tuple[int, ...], block: tuple[int, ...]) -> Scores:
    """Scores of one block of test samples under a method and checkpoints, with a progress bar on a miss.

    The core stores them on disk under the block's indices, so a miss here is a load from disk
    when the block was computed before (in this process or another).
    """

    def compute() -> Scores:
        label = f"{method_label(method)}: scoring test samples {block[0]}–{block[-1]} against the training set"
        with progress_bar(label, show_time=True) as progress:
            return attribute(run, method, queries=list(block), checkpoints=list(checkpoints), progress=progress)

    return remembered(_block_key(run, method, checkpoints, block), compute)


def block_is_stored(run: Run, method: str, checkpoints: tuple[int, ...], block: tuple[int, ...]) -> bool:
    """Whether a block's scores exist already (in this process, or on disk), so that showing them computes nothing.

    The disk check rebuilds the keys api.attribute stores under (the method's default settings,
    the default task, the block's indices): keep it in step with api.attribute.
    """
    if is_remembered(_block_key(run, method, checkpoints, block)):
        return True
    state = state_artifact(run, METHODS[method](), list(checkpoints), Task())
    return state.is_complete() and run.artifact("scores", state=state.directory.name, queries=list(block)).is_complete()


def rows_of(scores_: Scores, queries: list[int]) -> Scores:
    """The rows of these test indices (each must be among the scores' queries), in that order."""
    position = {int(index): row for row, index in enumerate(scores_.query_indices)}
    rows = [position[int(query)] for query in queries]
    return dataclasses.replace(
        scores_, values=scores_.values[rows], query_labels=scores_.query_labels[rows],
        query_names=[scores_.query_names[row] for row in rows], query_indices=scores_.query_indices[rows],
        segment_values=None if scores_.segment_values is None else scores_.segment_values[:, rows],
    )


def stacked(parts: list[Scores]) -> Scores:
    """Scores of several blocks of one method as one Scores, queries in the blocks' order."""
    first = parts[0]
    return dataclasses.replace(
        first, values=np.concatenate([part.values for part in parts]),
        query_labels=np.concatenate([part.query_labels for part in parts]),
        query_names=[name for part in parts for name in part.query_names],
        query_indices=np.concatenate([part.query_indices for part in parts]),
        segment_values=None if first.segment_values is None else np.concatenate([part.segment_values for part in parts], axis=1),
        seconds=sum(part.seconds for part in parts),
    )


def query_scores(run: Run, method: str, checkpoints: tuple[int, ...], query: int) -> Scores:
    """Scores of one test sample (one row), computed with its block (see QUERY_BLOCK) on a miss."""
    _, test_set = run.datasets()
    return rows_of(block_scores(run, method, checkpoints, query_block(query, len(test_set))), [query])


def first_queries_scores(run: Run, method: str, checkpoints: tuple[int, ...], n_queries: int, *,
                         progress: ProgressFn | None = None) -> Scores:
    """Scores of the first n_queries test samples, block by block (each computed with its progress bar on a miss).

    progress(blocks done, blocks) after each block, for a bar over the whole job.
    """
    _, test_set = run.datasets()
    blocks = blocks_covering(n_queries, len(test_set))
    parts = []
    for done, block in enumerate(blocks, start=1):
        parts.append(block_scores(run, method, checkpoints, block))
        if progress is not None:
            progress(done, len(blocks))
    return rows_of(stacked(parts), list(range(min(n_queries, len(test_set)))))


def first_queries_stored(run: Run, method: str, checkpoints: tuple[int, ...], n_queries: int) -> bool:
    """Whether first_queries_scores would compute nothing (every block it needs exists already)."""
    _, test_set = run.datasets()
    return all(block_is_stored(run, method, checkpoints, block) for block in blocks_covering(n_queries, len(test_set)))
