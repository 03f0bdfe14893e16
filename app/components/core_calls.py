"""Cached calls into the attribution core, and how their errors reach the page.

Runs and small tables use Streamlit's caches. Scores are never computed in a page: a page that
shows test sample q reads the stored scores of the block holding q (jobs.ready.QUERY_BLOCK), and
when they are not stored the block is handed to a job (components/jobs.py) whose progress the page
shows meanwhile. The whole test set stays a CLI/API job (`tdx attribute`, `tdx lds`).
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
from attribution_core.api import METHODS, default_checkpoints
from attribution_core.errors import TdxError
from attribution_core.jobs.kinds import fit_job, load_result, scores_job
from attribution_core.jobs.queue import INTERACTIVE, REQUESTED
from attribution_core.jobs.ready import blocks_covering, heavy_work, large_run, offered_methods, query_block, quick_method
from attribution_core.runs.run import Run, load_run
from attribution_core.scores import Scores
from attribution_core.store import Workspace
from attribution_core.trust import trust, untrusted

from .context import current_run_id, workspace_root
from .jobs import job_result

T = TypeVar("T")

_REMEMBERED_RESULTS = 48
"""How many computed results (predictions, tables) the process keeps in memory."""


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
    ask_consent_to_its_code(run)
    return run


def ask_consent_to_its_code(run: Run) -> None:
    """Stop the page, importing nothing, while the run names code the user has not agreed to run: list it, offer consent."""
    needed = untrusted(run.code(), run.workspace.root)
    if not needed:
        return
    st.warning(f"Run **{run.run_id}** imports code that is neither installed nor part of tda-explorer: opening, retraining and "
               "replaying the run run it. Read it first; nothing of it has been imported.", icon=":material/gpp_maybe:")
    st.dataframe(pd.DataFrame(needed, columns=["module", "file"]), hide_index=True)
    st.button("Trust this code and open the run", key="trust_code", icon=":material/verified_user:",
              on_click=trust, args=([module for module, _ in needed], run.workspace.root),
              help="Remembered for this workspace (outside it, in tda-explorer's settings folder): `tdx trust` does the same")
    st.stop()


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
        probabilities = inspection.test_probabilities(run)  # stored: the ready jobs compute it before a page asks
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
    return offered_methods(run)


def unsupported_methods(run: Run) -> dict[str, str]:
    """The methods that cannot attribute this run: name -> the core's reason."""
    reasons = {name: method.unsupported_reason(run) for name, method in METHODS.items()}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def default_checkpoint_range(run: Run, method: str) -> tuple[int, int]:
    """(first, last) of the checkpoints the method uses by default."""
    chosen = default_checkpoints(run, method)
    return chosen[0], chosen[-1]


def block_scores(run: Run, method: str, checkpoints: tuple[int, ...], block: list[int], *, container=None,
                 priority: int = INTERACTIVE) -> Scores | None:
    """Scores of one block of test samples under a method and checkpoints, or None while its job runs (its panel shown)."""
    return job_result(run, scores_job(run, method, block, list(checkpoints), priority=priority), container=container)


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


def fitted(run: Run, method: str, checkpoints: tuple[int, ...]) -> bool:
    """Whether the method's fit at these checkpoints is stored (read, never computed)."""
    return load_result(run, fit_job(run, method, list(checkpoints))) is not None


def query_scores(run: Run, method: str, checkpoints: tuple[int, ...], query: int, *, container=None) -> Scores | None:
    """Scores of one test sample (one row), read from its block; None while the block's job runs (its panel shown).

    Heavy work (jobs.ready.heavy_work: on a large run, a fit or a block that streams the training set) runs in the
    background lane, so that the clicks' jobs are not stuck behind it: an unfitted method's fit is asked for alone (its
    panel shown), and its block once the fit is stored.
    """
    _, test_set = run.datasets()
    block = query_block(query, len(test_set))
    if large_run(run) and heavy_work(run, method, fitted=fitted(run, method, checkpoints)):
        if not fitted(run, method, checkpoints):
            job_result(run, fit_job(run, method, list(checkpoints), priority=REQUESTED), container=container)
            return None
        scores_ = block_scores(run, method, checkpoints, block, container=container, priority=REQUESTED)
    else:
        scores_ = block_scores(run, method, checkpoints, block, container=container)
    return None if scores_ is None else rows_of(scores_, [query])


def stand_in_method(run: Run, method: str, checkpoints: tuple[int, ...], query: int) -> str | None:
    """The quick method a page shows while this method's heavy work runs (jobs.ready.heavy_work), or None when it shows none."""
    _, test_set = run.datasets()
    if not large_run(run) or not heavy_work(run, method, fitted=fitted(run, method, checkpoints)):
        return None
    if stored_scores_of(run, method, checkpoints, query_block(query, len(test_set))):
        return None
    return quick_method(run)


def stored_scores_of(run: Run, method: str, checkpoints: tuple[int, ...], block: list[int]) -> bool:
    """Whether a block of the method's scores is stored."""
    return load_result(run, scores_job(run, method, block, list(checkpoints))) is not None


def first_queries_scores(run: Run, method: str, checkpoints: tuple[int, ...], n_queries: int, *, container=None) -> Scores | None:
    """Scores of the first n_queries test samples, from their blocks; None while any block's job runs (their panels shown).

    The blocks are work a user asked for, not one a page waits on: they queue behind the clicks.
    """
    _, test_set = run.datasets()
    parts = [block_scores(run, method, checkpoints, block, container=container, priority=REQUESTED)
             for block in blocks_covering(n_queries, len(test_set))]
    if any(part is None for part in parts):
        return None
    return rows_of(stacked(parts), list(range(min(n_queries, len(test_set)))))
