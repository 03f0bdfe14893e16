"""Workers: processes that take jobs from the workspace's queue and run them, beside the app's server.

Two lanes per workspace, one worker process each (a lock file keeps it to one):
- "interactive" takes only the jobs a page waits on (a score block, the fit it needs), so that a
  click is answered while a long job runs; while idle it loads each run's data and fitted default
  method, so that the first click costs only its scores;
- "background" takes everything, most urgent first, yields a resumable job (a ground truth)
  to a more urgent one between its progress reports, and pauses between them while the interactive
  lane runs a job a page waits on (courtesy: the two lanes share the CPU cores).
Workers run niced below the server, so pages stay quick while they work. The app's server starts
them (ensure_workers) and they stop when it goes: a running job goes back to the queue, and the
next worker resumes it from what its artifacts hold. `tdx jobs run` works through the queue in
the foreground instead.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from ..api import prepare
from ..errors import TdxError
from ..progress import RemainingTime
from ..runs.run import Run, load_run
from ..store import Workspace, lock_wait_listeners
from .kinds import KINDS, find_kind, fit_job, job_kind, load_result
from .queue import CANCELLED, DONE, FAILED, INTERACTIVE, PREFETCH, QUEUED, Job, JobQueue
from .ready import default_method, queue_ready_jobs

LANES: dict[str, int] = {"interactive": INTERACTIVE, "background": PREFETCH}
"""Each lane's worker takes the queued jobs of priority <= this."""

NICENESS = {"interactive": 5, "background": 12}
"""How far below the server each lane runs (Linux nice): the page the user looks at comes first."""

POLL_SECONDS = 0.2
"""How often an idle worker looks at the queue."""

HANDOFF_SECONDS = 1.0
"""The background lane leaves a job a page waits on to the interactive lane for this long: that worker holds the run's
data and fitted state loaded (a 60,000-image run's block: 0.3 s there, 1.9 s in a worker that loads them first)."""

REPORT_SECONDS = 0.5
"""The least time between two progress reports written to the queue (and cancel checks)."""

BEAT_SECONDS = 5.0
"""How often a worker tells the queue it is alive while a job runs (and checks that its parent server is)."""

clock = time.time
"""The wall clock a job's estimated finish is read on (JobQueue.report; tests drive a job on a fake one)."""

COURTESY_SECONDS = 30.0
"""The longest the background lane pauses for one job a page waits on: a bound in case that job waits for something the
paused job holds other than an artifact's lock (for which the pause ends at once: waiting_marker)."""

IDLE_EXIT_SECONDS = 900.0
"""A worker started by the app ends after this long without work; the app starts another when it needs one."""


class JobStopped(Exception):
    """Raised from a progress report to stop a job: cancelled by a user, or yielding to a more urgent job."""

    def __init__(self, state: str):
        super().__init__(state)
        self.state = state


def _lock_path(root: Path, lane: str) -> Path:
    return root / "jobs" / f"{lane}.lock"


@contextlib.contextmanager
def _lane_lock(root: Path, lane: str) -> Iterator[bool]:
    """Hold the lane's lock while the block runs; yields False (holding nothing) when another worker has it."""
    path = _lock_path(root, lane)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def lane_busy(root: str | os.PathLike, lane: str) -> bool:
    """Whether a worker holds the lane's lock for this workspace."""
    with _lane_lock(Path(root).expanduser().resolve(), lane) as acquired:
        return not acquired


class _Runs:
    """Runs opened by this worker, reused while their run.json is unchanged (datasets load once)."""

    def __init__(self, root: Path):
        self.workspace, self.cache = Workspace(root), {}

    def target(self, job: Job) -> Run | Workspace:
        """What the job's kind works on: its run, or the workspace for a kind that makes the run."""
        return self.workspace if job_kind(job.spec.kind).new_run else self.get(job.spec.run_id, job.spec.run_created)

    def warming(self, run_id: str) -> Iterator[bool]:
        """Load a run, its data and its default method's fitted state (when stored), so a page's first query costs only its
        scores; one step per next(), so that a job a page asks for meanwhile is claimed between them (a 60,000-image run's
        data takes seconds to load)."""
        with contextlib.suppress(TdxError, OSError):
            run = self.get(run_id, load_run(self.workspace, run_id).created)
            yield True
            run.datasets()
            yield True
            method = default_method(run)
            if load_result(run, fit_job(run, method)) is not None:
                prepare(run, method)  # the state stays loaded in this process (state_cache)
                yield True

    def get(self, run_id: str, created: str) -> Run:
        run = self.cache.get(run_id)
        if run is None or run.created != created:
            run = load_run(self.workspace, run_id)
            self.cache[run_id] = run
        if run.created != created:
            raise TdxError(f"run {run_id!r} was trained again since this job was asked for: ask again on the page")
        return run


def waiting_marker(root: Path) -> Path:
    """The file that exists while the interactive lane's job waits for an artifact's lock (store.lock_wait_listeners)."""
    return root / "jobs" / "interactive.waiting"


def _mark_waiting(marker: Path, waiting: bool) -> None:
    if waiting:
        marker.touch()
    else:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock_waits_marked(root: Path) -> Iterator[None]:
    """While the block runs, this process's waits for an artifact's lock show as the waiting_marker (a stale one is removed)."""
    listener = partial(_mark_waiting, waiting_marker(root))
    listener(False)
    lock_wait_listeners.append(listener)
    try:
        yield
    finally:
        lock_wait_listeners.remove(listener)


class Courtesy:
    """Pauses a background job between its progress reports while jobs that pages wait on run, each such job at most once
    and for at most COURTESY_SECONDS; never while the interactive lane waits for a lock (the paused job may hold it)."""

    def __init__(self, queue: JobQueue, key: str, marker: Path):
        self.queue, self.key, self.marker, self.waited_for = queue, key, marker, set()

    def pause(self, waiting: Callable[[float], None]) -> float:
        """Wait while an interactive job not waited for before runs (waiting(seconds so far) at most every REPORT_SECONDS);
        returns the seconds waited."""
        urgent = self.queue.running_keys(INTERACTIVE) - self.waited_for - {self.key}
        if not urgent or self.marker.exists():
            return 0.0
        self.waited_for |= urgent
        started = told = time.monotonic()
        deadline = started + COURTESY_SECONDS
        while time.monotonic() < deadline and urgent & self.queue.running_keys(INTERACTIVE) and not self.marker.exists():
            job = self.queue.get(self.key)
            if job is None or job.cancel_requested:
                break
            time.sleep(POLL_SECONDS)
            if (now := time.monotonic()) - told >= REPORT_SECONDS:  # reports are written as seldom as progress's
                waiting(now - started)
                told = now
        return time.monotonic() - started


def execute(queue: JobQueue, job: Job, runs: _Runs, max_priority: int, leave_fresh: tuple[int, float] | None = None,
            *, courtesy: bool = False) -> str:
    """Run one claimed job to its end; returns the state it ends in (done, failed, cancelled, or queued when it yielded).

    A resumable job yields to a more urgent one that this worker would claim (max_priority, leave_fresh: JobQueue.claim).
    courtesy: a job no page waits on pauses while one that a page waits on runs in the other lane (Courtesy).
    """
    kind = find_kind(job.spec.kind)
    if kind is None:  # queued by another version of tdx: the job fails with a message, the worker goes on
        queue.finish(job.key, FAILED, f"unknown job kind {job.spec.kind!r}: this version of tdx cannot run it; kinds: {', '.join(KINDS)}")
        return FAILED
    last, estimate = {"report": -float("inf")}, RemainingTime()
    pauses = Courtesy(queue, job.key, waiting_marker(runs.workspace.root)) if courtesy and job.spec.priority > INTERACTIVE else None

    def report_pause(done: int, total: int, waited: float) -> None:  # the time left holds still while the job waits
        queue.report(job.key, done, total, finish=None if estimate.finish is None else estimate.finish + waited, note=RemainingTime.PAUSED)

    def progress(done: int, total: int) -> None:
        now = clock()
        estimate.feed(done, total, now)  # every step: the estimate sees the pace between reports too
        if now - last["report"] < REPORT_SECONDS and done < total:
            return
        last["report"] = now
        if queue.report(job.key, done, total, finish=estimate.finish, note=estimate.note):
            raise JobStopped(CANCELLED)
        if kind.resumable and queue.more_urgent_waiting(job.spec.priority, max_priority, leave_fresh=leave_fresh):
            raise JobStopped(QUEUED)
        if pauses is not None and (waited := pauses.pause(partial(report_pause, done, total))) > 0:
            estimate.paused(waited)
            last["report"] = -float("inf")  # the next step reports at once: the page sees the job going on

    try:
        kind.run(runs.target(job), job.spec.params, progress)
        if kind.new_run:  # what the new run's first pages will show, computed before anyone opens them
            queue_ready_jobs(runs.workspace, [runs.get(job.spec.run_id, load_run(runs.workspace, job.spec.run_id).created)])
    except JobStopped as stop:
        if stop.state == QUEUED:
            queue.requeue(job.key)
        else:
            queue.finish(job.key, CANCELLED)
        return stop.state
    except TdxError as exc:
        queue.finish(job.key, FAILED, str(exc), retryable=exc.retryable)
        return FAILED
    except Exception as exc:  # noqa: BLE001 (a bug in one job must not end the worker; its message reaches the page)
        traceback.print_exc()
        queue.finish(job.key, FAILED, f"Internal error: {type(exc).__name__}: {exc}")
        return FAILED
    queue.finish(job.key, DONE)
    return DONE


def _watch(queue: JobQueue, current: dict, parent_pid: int | None, stop: threading.Event) -> None:
    """Keep the running job's heartbeat fresh; when the parent server is gone, queue the job again and end the process."""
    while not stop.wait(BEAT_SECONDS):
        key = current.get("key")
        if parent_pid is not None and os.getppid() != parent_pid:
            if key is not None:
                queue.requeue(key)
            os._exit(0)  # the job's own thread may be deep in a computation: end now, it resumes from its artifacts
        if key is not None:
            queue.beat(key)


def work(root: str | os.PathLike, lane: str = "background", *, parent_pid: int | None = None,
         idle_exit: float | None = IDLE_EXIT_SECONDS, until_empty: bool = False, threads: int | None = None) -> int:
    """Take and run the lane's jobs until idle for idle_exit seconds (or the queue is empty, with until_empty); returns jobs run.

    Returns 0 at once when another worker already serves this lane of the workspace.
    """
    root_path = Path(root).expanduser().resolve()
    if lane not in LANES:
        raise TdxError(f"unknown lane {lane!r}; lanes: {', '.join(LANES)}")
    with _lane_lock(root_path, lane) as acquired:
        if not acquired:
            return 0
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        queue, runs, current, stop = JobQueue(root_path), _Runs(root_path), {}, threading.Event()
        watcher = threading.Thread(target=_watch, args=(queue, current, parent_pid, stop), daemon=True)
        watcher.start()
        count, idle_since = 0, time.monotonic()
        run_ids = runs.workspace.run_ids() if lane == "interactive" and not until_empty else []
        warming = itertools.chain.from_iterable(runs.warming(run_id) for run_id in run_ids)
        leave_fresh = (INTERACTIVE, HANDOFF_SECONDS) if lane == "background" and not until_empty else None
        lock_waits = _lock_waits_marked(root_path) if lane == "interactive" else contextlib.nullcontext()
        try:
            with lock_waits:
                while True:
                    queue.requeue_stale()
                    job = queue.claim(LANES[lane], os.getpid(), leave_fresh=leave_fresh)
                    if job is None:
                        if until_empty or (idle_exit is not None and time.monotonic() - idle_since > idle_exit):
                            return count
                        if not next(warming, False):  # idle: a step of getting the runs ready for the clicks to come, else wait
                            time.sleep(POLL_SECONDS)
                        continue
                    current["key"] = job.key
                    try:
                        execute(queue, job, runs, LANES[lane], leave_fresh, courtesy=lane == "background" and not until_empty)
                    except BaseException:  # KeyboardInterrupt, SystemExit: leave the job for the next worker
                        queue.requeue(job.key)
                        raise
                    finally:
                        current.pop("key", None)
                    count, idle_since = count + 1, time.monotonic()
        finally:
            stop.set()


JOBS_ENV = "TDX_JOBS"
"""Who runs a workspace's jobs: "process" (default) the lane workers; "inline" the caller itself (the app runs a job in the
page, for AppTest); "manual" nobody until someone calls work() (tests that look at each job state)."""


def job_mode() -> str:
    """process, inline or manual, from TDX_JOBS (anything else counts as process)."""
    mode = os.environ.get(JOBS_ENV, "process")
    return mode if mode in ("process", "inline", "manual") else "process"


_spawned: dict[tuple[str, str], tuple[subprocess.Popen, float]] = {}
_spawn_lock = threading.Lock()
SPAWN_GRACE_SECONDS = 30.0
"""A worker just started needs a few seconds (importing torch) before it holds its lock: do not start another meanwhile."""


def ensure_workers(root: str | os.PathLike) -> None:
    """Start the workspace's lane workers that are not running, as children of this process (which they outlive by at most a beat).

    Does nothing unless job_mode() is "process".
    """
    if job_mode() != "process":
        return
    root_path = Path(root).expanduser().resolve()
    with _spawn_lock:
        for lane in LANES:
            process, started = _spawned.get((str(root_path), lane), (None, 0.0))
            if process is not None and process.poll() is None and time.monotonic() - started < SPAWN_GRACE_SECONDS:
                continue
            if lane_busy(root_path, lane):
                continue
            _spawned[(str(root_path), lane)] = (_spawn(root_path, lane), time.monotonic())


def _spawn(root: Path, lane: str) -> subprocess.Popen:
    log = root / "jobs" / f"{lane}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Passive OpenMP threads: two workers and the server share the cores without spinning on each other.
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "a") as output:
        return subprocess.Popen(  # noqa: S603 (fixed argv: this interpreter and this module)
            [sys.executable, "-m", "attribution_core.jobs.worker", "--workspace", str(root), "--lane", lane,
             "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env,
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m attribution_core.jobs.worker --workspace W --lane L [--parent PID]`: one lane's worker (started by ensure_workers)."""
    parser = argparse.ArgumentParser(description="a tda-explorer job worker (the app starts these itself)")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--lane", default="background", choices=list(LANES))
    parser.add_argument("--parent", type=int, default=None, help="end when this process is gone")
    args = parser.parse_args(argv)
    os.nice(NICENESS[args.lane])
    threads = max(1, (os.cpu_count() or 2) // (1 if args.lane == "interactive" else 2))
    with contextlib.suppress(KeyboardInterrupt):
        work(args.workspace, args.lane, parent_pid=args.parent, threads=threads)


if __name__ == "__main__":
    main()
