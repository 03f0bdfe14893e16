"""Cached calls into the core's evaluation (mislabel rankings, LDS ground truth), imported lazily.

The evaluation modules may not exist yet while the core is being written: each accessor returns
None then, and the page says so instead of showing anything made up.
"""
from __future__ import annotations

import numpy as np

from attribution_core.training import Run

from .context import optional_core_module
from .core_calls import method_choices, remembered, run_key
from .progress import progress_bar


def mislabel_module():
    """attribution_core.evaluation.mislabel, or None while it is missing."""
    return optional_core_module("evaluation.mislabel")


def lds_module():
    """attribution_core.evaluation.lds, or None while it is missing."""
    return optional_core_module("evaluation.lds")


def ranking_choices(run: Run) -> dict[str, str]:
    """Mislabel rankings the run can use (self-influence only of available methods): name -> description."""
    module = mislabel_module()
    available = set(method_choices(run))
    return {name: description for name, description in module.RANKINGS.items()
            if not name.startswith("self_influence:") or name.split(":", 1)[1] in available}


def mislabel_ranking(run: Run, ranking: str):
    """The run's training set ranked by `ranking` (MislabelRanking), with a progress bar on a miss."""

    def compute():
        with progress_bar(f"Ranking the training set by {ranking}") as progress:
            return mislabel_module().rank_mislabels(run, ranking, progress=progress)

    return remembered(("mislabels", *run_key(run), ranking), compute)


def recall_curve(order: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction inspected, fraction of flipped labels found) walking a ranking's order: (N,) each."""
    found = np.cumsum(np.asarray(flipped, dtype=bool)[order]) / max(1, int(np.sum(flipped)))
    inspected = np.arange(1, len(order) + 1) / len(order)
    return inspected, found


def stored_lds_settings(run: Run) -> list:
    """LdsSettings of every complete ground truth stored for the run (read from the artifacts' manifests)."""
    module = lds_module()
    folder = run.directory / "groundtruth"
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        artifact = run.workspace.artifact(run.run_id, "groundtruth", entry.name) if entry.is_dir() else None
        if artifact is not None and artifact.is_complete():
            found.append(module.LdsSettings(**artifact.manifest()["inputs"]["settings"]))
    return found
