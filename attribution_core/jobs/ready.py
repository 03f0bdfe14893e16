"""What the app's pages open with, and the jobs that compute it ahead of the first visit.

When a run is trained (`tdx train`, `tdx demo`), the work its first pages will ask for is queued
at once: the default method's fit and the first query's scores (Explore), the map of the last
checkpoint (Map), the default mislabel ranking (Mislabels), the two compared methods' scores of
the first LDS_QUERIES test samples and, for the demo, an LDS ground truth (Compare). The pages
read the same definitions, so what was queued is what they find.

A large run (large_run: training examples x parameters) opens cheap first: a pass of per-example
gradients over it takes minutes on a CPU, so its pages first show a quick method's scores
(Method.quick, labelled as such) while the default method's fit runs in the background lane, and
the default method's scores replace them when it is done. Work that passes over the whole training
set for every block of queries (exact TracIn, unprojected influence, replay) is queued only when
asked, behind the clicks (heavy_work).
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


LARGE_RUN_WORK = 5e9
"""A run is large when its training examples times its parameters reach this: one pass of per-example gradients over
it (a fit, an exact block of scores) then takes minutes on a 2-core CPU. The demo's MLPs: 3,000 x 101,770 = 3e8; the
60,000-image CNN of `tdx demo --full`: 60,000 x 421,642 = 2.5e10."""


def large_run(run: Run) -> bool:
    """Whether the run is too large for its pages to wait on a per-example-gradient pass (LARGE_RUN_WORK)."""
    train_set, _ = run.datasets()
    n_parameters = run.metrics.get("n_parameters")
    if n_parameters is None:
        n_parameters = sum(parameter.numel() for parameter in run.load_model(-1).parameters())
    return len(train_set) * int(n_parameters) >= LARGE_RUN_WORK


def quick_method(run: Run) -> str | None:
    """The method a large run's pages show while a heavier method's fit runs: the first offered quick one (None: none is)."""
    return next((name for name in offered_methods(run) if METHODS[name].quick), None)


def heavy_work(run: Run, method: str, *, fitted: bool) -> bool:
    """Whether a block of the method's scores on this run is work for the background lane, not one a click waits on.

    On a large run: a method that is not quick, before its fit is stored (the fit is a pass of per-example gradients
    at each of its checkpoints), or whose every block passes over the training set again (Method.streams_training_set).
    """
    if METHODS[method].quick or not large_run(run):
        return False
    return not fitted or METHODS[method]().streams_training_set()


def offered_methods(run: Run) -> list[str]:
    """The methods that can attribute this run, in the core's display order."""
    return [name for name, method in METHODS.items() if method.unsupported_reason(run) is None]


def default_method(run: Run) -> str:
    """The method Explore and Map open with: the first one offered."""
    return offered_methods(run)[0]


def compared_methods(run: Run) -> list[str]:
    """The two methods Compare opens with: the first offered ones whose fit holds self-influence (cheap to fit and score).

    On a large run: the default method and the quick one (exact TracIn would pass over the training set at every
    checkpoint for each block; it is one click away).
    """
    if large_run(run) and (quick := quick_method(run)) is not None and quick != default_method(run):
        return [default_method(run), quick]
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
    if large_run(run) and (quick := quick_method(run)) is not None:
        return _large_ready_jobs(run, method, quick, first_block)
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


def _large_ready_jobs(run: Run, method: str, quick: str, first_block: list[int]) -> list[JobSpec]:
    """A large run's ready jobs: the quick method's fit and first block, the map, the ranking and the representations (each a
    forward pass or less), then the default method's fit and its first block; no ground truth, no block that streams."""
    specs = [fit_job(run, quick, priority=PREFETCH),
             scores_job(run, quick, first_block, priority=PREFETCH),
             layout_job(run, -1, priority=PREFETCH),
             ranking_job(run, default_ranking(run)[0], priority=PREFETCH),
             representations_job(run, -1, priority=PREFETCH),
             fit_job(run, method, priority=PREFETCH)]
    if not heavy_work(run, method, fitted=True):
        specs.append(scores_job(run, method, first_block, priority=PREFETCH))
    return specs


def queue_ready_jobs(workspace: Workspace, runs: list[Run], *, with_groundtruth: bool = False) -> list[Job]:
    """Queue the ready jobs of these runs whose results are not stored yet (every run's fit first); returns their rows."""
    per_run = {run.run_id: (run, ready_jobs(run, with_groundtruth=with_groundtruth)) for run in runs}
    ordered = [(run, specs[0]) for run, specs in per_run.values()] + [
        (run, spec) for run, specs in per_run.values() for spec in specs[1:]]
    unique = list({spec.key: (run, spec) for run, spec in ordered}.values())  # a spec asked for twice keeps its first place
    queue = JobQueue(workspace.root)
    return [queue.submit(spec) for run, spec in unique if load_result(run, spec) is None]
