"""Cached calls into the core's mislabel rankings."""
from __future__ import annotations

from attribution_core.evaluation.mislabel import MislabelRanking, rank_mislabels, rankings_for
from attribution_core.run import Run

from .core_calls import remembered, run_key
from .progress import progress_bar


def ranking_choices(run: Run) -> dict[str, str]:
    """Mislabel rankings the run can use (self-influence only of methods that support it): name -> description."""
    return rankings_for(run)


def mislabel_ranking(run: Run, ranking: str) -> MislabelRanking:
    """The run's training set ranked by `ranking`, with a progress bar on a miss."""

    def compute() -> MislabelRanking:
        with progress_bar(f"Ranking the training set by {ranking}") as progress:
            return rank_mislabels(run, ranking, progress=progress)

    return remembered(("mislabels", *run_key(run), ranking), compute)
