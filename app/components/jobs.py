"""Long work off the page: results come from the store, or from a job whose progress the page shows meanwhile.

A page asks `job_result(run, spec)`: the stored result when there is one (read, never computed),
otherwise the job is submitted to the workspace's queue (attribution_core.jobs) and a panel shows
its progress, an estimate and a cancel button, refreshed by a fragment while the rest of the page
stays usable. When the job ends the whole page reruns and finds the result stored. The same work
asked from a second tab, or after a reload, is the same job: it is never started twice.

TDX_JOBS chooses who runs the jobs (attribution_core.jobs.worker.job_mode): "process" (default) the
workers beside the server; "inline" the page itself, with a progress bar (AppTest); "manual" nobody
until a test runs them.
"""
from __future__ import annotations

import time
from typing import Any

import streamlit as st

from attribution_core.jobs.kinds import find_kind, job_kind, load_result
from attribution_core.jobs.queue import ACTIVE, CANCELLED, DONE, FAILED, QUEUED, Job, JobQueue, JobSpec
from attribution_core.jobs.worker import ensure_workers, job_mode
from attribution_core.runs.run import Run
from attribution_core.store import Workspace

from .context import workspace_root
from .progress import progress_bar

WAIT_SECONDS = 1.5
"""A job that ends this soon after it is asked for is shown as if computed in the page: no panel flashes by. The budget is
per script run, shared by every job the run asks for (a page asking for eight blocks waits 1.5 s, not 12)."""

_WAIT_UNTIL = "job_wait_until"
"""Session state: when this script run stops waiting for jobs to end (set by begin_script_run)."""

REFRESH_SECONDS = 1.0
"""How often a progress panel redraws."""

RESUBMIT_AFTER_SECONDS = 10.0
"""A job done longer ago than this whose result is gone (deleted from the workspace) runs again; a newer one is a bug to show."""

def job_queue() -> JobQueue:
    """The app's workspace's job queue."""
    return JobQueue(workspace_root())


def start_workers() -> None:
    """Make sure the workspace's workers run (process mode): called on every page run, cheap when they do."""
    ensure_workers(workspace_root())


def begin_script_run() -> None:
    """Start this script run's budget for waiting on quick jobs (main.py, before the page draws)."""
    st.session_state[_WAIT_UNTIL] = time.monotonic() + WAIT_SECONDS


def job_result(run: Run | Workspace, spec: JobSpec, *, submit: bool = True, container=None) -> Any:
    """The job's stored result, or None after showing its progress (submitting it first unless submit=False).

    run: the run the job is about (the workspace for a job that trains a new run).

    With submit=False a job nobody asked for shows nothing (the caller offers a button), while a
    queued, running, failed or cancelled one shows its panel.
    """
    target = container or st.container()
    value = load_result(run, spec)
    if value is not None:
        return value
    if job_mode() == "inline":
        return _run_inline(run, spec, target) if submit else None
    queue = job_queue()
    job = queue.get(spec.key)
    if job is None or (job.state == DONE and _finished_long_ago(job)) or (job.state in ACTIVE and spec.priority < job.spec.priority):
        if job is None and not submit:
            return None
        job = queue.submit(spec)
    job = _wait_briefly(queue, job)
    if job.state == DONE:
        value = load_result(run, spec)
        if value is None:
            target.error(f"{spec.title}: the job finished but its result is not in the workspace. This is a bug; please report it.",
                         icon=":material/bug_report:")
        return value
    with target:
        if job.state in (FAILED, CANCELLED):
            _stopped_panel(job)
        else:
            _progress_panel(job.key)
    return None


def _run_inline(run: Run | Workspace, spec: JobSpec, target) -> Any:
    with target, progress_bar(spec.title, show_time=True) as progress:
        job_kind(spec.kind).run(run, spec.params, progress)
    return load_result(run, spec)


def _finished_long_ago(job: Job) -> bool:
    return time.time() - (job.finished or 0) > RESUBMIT_AFTER_SECONDS


def _wait_briefly(queue: JobQueue, job: Job) -> Job:
    """The job's row after waiting, within this script run's budget (WAIT_SECONDS), for it to end: a quick job shows no panel."""
    deadline = st.session_state.get(_WAIT_UNTIL, 0.0)
    while job.state in ACTIVE and time.monotonic() < deadline and job_mode() == "process":
        time.sleep(0.1)
        job = queue.get(job.key) or job
    return job


def duration(seconds: float) -> str:
    """'8 s', '2 min 5 s', '1 h 3 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def status_line(job: Job, queue: JobQueue, now: float | None = None) -> str:
    """Where a job is: its place in the queue, or its progress, time so far and the time left.

    The time left is the worker's estimate (Job.remaining: it counts down and never grows while the job keeps its pace;
    when it was made again, the note says why), or before the job has one, what its kind took on this run last time.
    """
    now = now or time.time()
    if job.state == QUEUED:
        ahead = queue.ahead(job.key)
        resumed = f" (resumes at {job.done} of {job.total})" if job.done else ""
        return (f"Waiting: {ahead} job{'s' if ahead != 1 else ''} ahead" if ahead else "Waiting for a worker") + resumed
    parts = [f"{job.done:,} of {job.total:,}"] if job.total else []
    parts.append(f"{duration(job.elapsed(now))} so far")
    remaining = job.remaining(now)
    if remaining is None and (typical := queue.typical_seconds(job.spec.kind, job.spec.run_id)) is not None:
        remaining = max(0.0, typical - job.elapsed(now))
    if remaining is None:
        parts.append("estimating the time left")
    elif remaining >= 1:
        parts.append(f"about {duration(remaining)} left")
    else:
        parts.append("finishing")
    if job.estimate_note:
        parts.append(job.estimate_note)
    if job.cancel_requested:
        parts.append("stopping…")
    return " · ".join(parts)


@st.fragment(run_every=REFRESH_SECONDS)
def _progress_panel(key: str) -> None:
    """A running or queued job: title, bar, status line, hint and cancel; reruns the page once the job ends."""
    queue = job_queue()
    job = queue.get(key)
    if job is None or job.state not in ACTIVE:
        st.rerun()  # the page picks the result up, or shows why the job stopped
    with st.container(border=True, key=f"job_{key}"):
        st.markdown(f":material/hourglass_top: **{job.spec.title}**")
        st.progress(job.fraction, text=status_line(job, queue))
        hint_column, cancel_column = st.columns([4, 1], vertical_alignment="center")
        kind = find_kind(job.spec.kind)  # None for a kind of another version of tdx: its title says enough
        hint_column.caption((kind.hint + " " if kind is not None else "") + "The page stays usable meanwhile.")
        cancel_column.button("Cancel", key=f"cancel_{key}", icon=":material/stop_circle:", on_click=queue.cancel, args=(key,),
                             disabled=job.cancel_requested, width="stretch")


def _stopped_panel(job: Job) -> None:
    """A failed or cancelled job: why, and a button to run it again where that may succeed."""
    with st.container(border=True, key=f"job_{job.key}"):
        if job.state == FAILED:
            st.error(f"**{job.spec.title}** failed: {job.error}", icon=":material/error:")
            if not job.retryable:  # the same job would fail the same way: only other inputs can help
                return
        else:
            done = f" ({job.done} of {job.total} done, kept)" if job.done else ""
            st.info(f"**{job.spec.title}** was cancelled{done}.", icon=":material/stop_circle:")
        st.button("Try again" if job.state == FAILED else "Start again", key=f"again_{job.key}", icon=":material/replay:",
                  on_click=job_queue().submit, args=(job.spec,))


def jobs_overview() -> None:
    """The sidebar's line on background work, refreshed while there is some; with none nothing is drawn or polled.

    Why not always a polling fragment: five tabs each rerunning it every few seconds, jobs or not, are a steady stream
    of script runs beside every click. A job started later shows from the next full run (any click) on.
    """
    queue = job_queue()
    if queue.path.exists() and queue.jobs(states=ACTIVE):
        _jobs_overview_live()


@st.fragment(run_every=2 * REFRESH_SECONDS)
def _jobs_overview_live() -> None:
    """What runs, how far, and how many wait (a fragment: it refreshes alone, until a full run finds no job active)."""
    active = job_queue().jobs(states=ACTIVE)
    if not active:
        return
    running = [job for job in active if job.state != QUEUED]
    waiting = len(active) - len(running)
    lines = [f":material/hourglass_top: {job.spec.run_id}: {job.spec.title} ({job.fraction:.0%})" for job in running]
    st.caption("**Background jobs**  \n" + "  \n".join(lines) + (f"  \n{waiting} waiting" if waiting else ""))
