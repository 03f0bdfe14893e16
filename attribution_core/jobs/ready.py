"""What the app's pages open with, and the jobs that compute it ahead of the first visit.

When a run is trained (`tdx train`, `tdx demo`), the work its first pages will ask for is queued
at once: the default method's fit and the first query's scores (Explore), the map of the last
checkpoint (Map), the default mislabel ranking (Mislabels), the two compared methods' scores of
the first LDS_QUERIES test samples and, for the demo, an LDS ground truth (Compare). The pages
read the same definitions, so what was queued is what they find.
"""
from __future__ import annotations

from ..evaluation.lds import LdsSettings
from ..evaluation.mislabel import default_ranking
from ..inspection import query_order, test_probabilities
from ..methods import METHODS
from ..runs.run import Run
from ..store import Workspace
from .kinds import fit_job, groundtruth_job, layout_job, load_result, ranking_job, representations_job, scores_job
from .queue import PREFETCH, Job, JobQueue, JobSpec

QUERY_BLOCK = 32
"""Test samples scored together: block b holds test indices [b × QUERY_BLOCK, (b + 1) × QUERY_BLOCK).

Asking for one test sample scores its whole block (the neighbours come almost free: replay
carries up to 32 queries backward in one replay, influence streams the training set once per
block), and the block is stored under its indices, so any sample of a visited block opens at once.
"""

LDS_QUERIES = 100
"""Compare's LDS covers the first this many test samples: the whole test set is a job for the command line (`tdx lds`)."""

FIRST_GROUND_TRUTH = LdsSettings(n_subsets=50)
"""The ground truth Compare opens with where a run stores none: 50 random halves, each retrained from scratch."""


def offered_methods(run: Run) -> list[str]:
    """The methods that can attribute this run, in the core's display order."""
    return [name for name, method in METHODS.items() if method.unsupported_reason(run) is None]


def default_method(run: Run) -> str:
    """The method Explore and Map open with: the first one offered."""
    return offered_methods(run)[0]


def compared_methods(run: Run) -> list[str]:
    """The two methods Compare opens with: the first offered ones whose fit holds self-influence (cheap to fit and score)."""
    return [name for name in offered_methods(run) if METHODS[name].self_influence_at_fit][:2]


def query_block(query: int, n_test: int) -> list[int]:
    """The block of test indices scored together with `query` (see QUERY_BLOCK), cut at the end of the test set."""
    start = query // QUERY_BLOCK * QUERY_BLOCK
    return list(range(start, min(start + QUERY_BLOCK, n_test)))


def blocks_covering(n_queries: int, n_test: int) -> list[list[int]]:
    """The blocks that hold the first n_queries test samples (the last one may reach past them)."""
    return [query_block(start, n_test) for start in range(0, min(n_queries, n_test), QUERY_BLOCK)]


def first_query(run: Run) -> int:
    """The test sample Explore opens with: the most confident misprediction (inspection.query_order)."""
    _, test_set = run.datasets()
    probabilities = test_probabilities(run)
    return int(query_order(probabilities.argmax(1), probabilities.max(1), test_set.y.numpy())[0])


def ready_jobs(run: Run, *, with_groundtruth: bool = False) -> list[JobSpec]:
    """The jobs that compute what the run's first pages show, most needed first (all PREFETCH).

    with_groundtruth: also an LDS ground truth and the compared methods' scores of the first
    LDS_QUERIES test samples (what Compare's LDS section shows); without it, only their block of the first query.
    """
    _, test_set = run.datasets()
    method, first_block = default_method(run), query_block(first_query(run), len(test_set))
    specs = [fit_job(run, method, priority=PREFETCH),
             scores_job(run, method, first_block, priority=PREFETCH),
             layout_job(run, -1, priority=PREFETCH),
             ranking_job(run, default_ranking(run)[0], priority=PREFETCH),
             representations_job(run, -1, priority=PREFETCH)]  # Explore's find-similar
    # Compare shows the compared methods' proponents of the first query, and with a ground truth their LDS on the first queries.
    blocks = blocks_covering(LDS_QUERIES, len(test_set)) if with_groundtruth else [first_block]
    specs += [scores_job(run, compared, block, priority=PREFETCH) for compared in compared_methods(run) for block in blocks]
    if with_groundtruth:
        specs.append(groundtruth_job(run, FIRST_GROUND_TRUTH, priority=PREFETCH))
    return specs


def queue_ready_jobs(workspace: Workspace, runs: list[Run], *, with_groundtruth: bool = False) -> list[Job]:
    """Queue the ready jobs of these runs whose results are not stored yet (every run's fit first); returns their rows."""
    per_run = {run.run_id: (run, ready_jobs(run, with_groundtruth=with_groundtruth)) for run in runs}
    ordered = [(run, specs[0]) for run, specs in per_run.values()] + [
        (run, spec) for run, specs in per_run.values() for spec in specs[1:]]
    unique = list({spec.key: (run, spec) for run, spec in ordered}.values())  # a spec asked for twice keeps its first place
    queue = JobQueue(workspace.root)
    return [queue.submit(spec) for run, spec in unique if load_result(run, spec) is None]
