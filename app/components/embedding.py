"""The Map page's 2-D layout: UMAP of the penultimate-layer representations of training and test examples, laid out by a job."""
from __future__ import annotations

from attribution_core.inspection import MapLayout
from attribution_core.jobs.kinds import layout_job
from attribution_core.runs.run import Run

from .jobs import job_result


def embedding(run: Run, checkpoint: int, *, container=None) -> MapLayout | None:
    """The stored map of a checkpoint, or None while its job lays it out (its progress panel shown)."""
    return job_result(run, layout_job(run, checkpoint), container=container)
