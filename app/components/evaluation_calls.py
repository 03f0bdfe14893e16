"""The core's mislabel rankings, read from the store or computed by a job."""
from __future__ import annotations

from attribution_core.evaluation.mislabel import MislabelRanking, rankings_for
from attribution_core.jobs.kinds import ranking_job
from attribution_core.run import Run

from .jobs import job_result


def ranking_choices(run: Run) -> dict[str, str]:
    """Mislabel rankings the run can use (self-influence only of methods that support it): name -> description."""
    return rankings_for(run)


def mislabel_ranking(run: Run, ranking: str, *, container=None) -> MislabelRanking | None:
    """The run's training set ranked by `ranking`, or None while its job runs (its progress panel shown)."""
    return job_result(run, ranking_job(run, ranking), container=container)
