"""How Explore, Compare and Map begin: the current run with its data and test predictions, and the chosen method's scores of the query."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from attribution_core.api import default_checkpoints
from attribution_core.data import Dataset
from attribution_core.runs.run import Run
from attribution_core.scores import Scores

from .core_calls import call_or_report, method_label, query_scores, require_run, stand_in_method, test_predictions
from .flagging import show_pending_toast
from .methods import checkpoint_range, method_selectbox


@dataclass(frozen=True)
class Prelude:
    """What a page about the current run starts from: the run, its training and test sets, the test predictions."""

    run: Run
    train_set: Dataset
    test_set: Dataset
    predictions: pd.DataFrame


@dataclass(frozen=True)
class Attribution:
    """The chosen method, the checkpoints it uses, and its scores of the chosen test sample (one row, computed with its block)."""

    method: str
    checkpoints: tuple[int, ...]
    scores: Scores


def page_prelude(title: str) -> Prelude:
    """The current run, its data and the final model's test predictions, then the page title.

    Stops the page when there is no run or a part of it cannot be loaded, after saying why. Shows the
    toast a flag or undo asked for before this run (flagging.announce: a dialog's callbacks cannot).
    """
    run = require_run()
    train_set, test_set = run.datasets()
    predictions = call_or_report(test_predictions, run)
    if predictions is None:
        st.stop()
    st.title(title)
    show_pending_toast()
    return Prelude(run, train_set, test_set, predictions)


def chosen_attribution(run: Run, query: int, method_container, checkpoint_container, *, container=None) -> Attribution | None:
    """The method selector and checkpoint range (drawn in the given containers) and the scores they give test sample `query`.

    The scores are read from the query's stored block of test samples (jobs.ready.QUERY_BLOCK).
    When the block is not stored its job runs in the background and None comes back, after its
    progress panel is drawn in `container` (or where the page is); an error is shown the same way.
    On a large run whose chosen method has heavy work to do first (a fit), the quick method's scores are returned
    meanwhile, said so above them: the page shows real proponents at once, and the chosen method's replace them by
    themselves when its job ends (its panel reruns the page).
    """
    method = method_selectbox(run, method_container)
    checkpoints = checkpoint_range(run, method, checkpoint_container)
    method_scores = call_or_report(query_scores, run, method, checkpoints, query, container=container)
    if method_scores is not None:
        return Attribution(method, checkpoints, method_scores)
    quick = call_or_report(stand_in_method, run, method, checkpoints, query)
    if quick is None:
        return None
    quick_checkpoints = tuple(default_checkpoints(run, quick))
    quick_scores = call_or_report(query_scores, run, quick, quick_checkpoints, query, container=container)
    if quick_scores is None:
        return None
    (container or st).info(f"Shown meanwhile: **{method_label(quick)}** (quick: one forward pass over the training set). "
                           f"{method_label(method)}'s scores replace them by themselves when its job above is done.",
                           icon=":material/swap_horiz:")
    return Attribution(quick, quick_checkpoints, quick_scores)
