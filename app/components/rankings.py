"""The core's mislabel rankings, read from the store or computed by a job."""
from __future__ import annotations

from attribution_core.evaluation.mislabel import MislabelRanking, default_ranking, rankings_for
from attribution_core.jobs.kinds import load_result, ranking_job
from attribution_core.runs.run import Run

from .jobs import job_result


def ranking_choices(run: Run) -> dict[str, str]:
    """Mislabel rankings the run can use (self-influence only of methods that support it): name -> description."""
    return rankings_for(run)


def mislabel_ranking(run: Run, ranking: str, *, container=None) -> MislabelRanking | None:
    """The run's training set ranked by `ranking`, or None while its job runs (its progress panel shown)."""
    return job_result(run, ranking_job(run, ranking), container=container)


def stored_rankings(run: Run, names: list[str] | dict[str, str]) -> list[str]:
    """Those of `names` whose ranking of the run is stored already (showing them costs nothing)."""
    return [name for name in names if load_result(run, ranking_job(run, name)) is not None]


def stored_default_ranking(run: Run) -> MislabelRanking | None:
    """The run's default ranking if it is stored already (`tdx demo` and `tdx train` queue it), else None; starts no job."""
    return load_result(run, ranking_job(run, default_ranking(run)[0]))
