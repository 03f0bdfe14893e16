"""The job queue and its workers: one job per piece of work, the most urgent first, cancel, yield, resume after a kill."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from attribution_core.api import attribute, stored_scores
from attribution_core.errors import SettingsError, WorkspaceError
from attribution_core.evaluation.lds import LdsSettings, groundtruth_status, load_groundtruth
from attribution_core.jobs import kinds
from attribution_core.jobs.kinds import JobKind, fit_job, groundtruth_job, load_result, representations_job, scores_job
from attribution_core.jobs.queue import (
    CANCELLED,
    DONE,
    FAILED,
    INTERACTIVE,
    PREFETCH,
    QUEUED,
    REQUESTED,
    RUNNING,
    JobQueue,
    JobSpec,
)
from attribution_core.jobs.ready import (
    LARGE_RUN_WORK,
    LDS_QUERIES,
    QUERY_BLOCK,
    blocks_covering,
    compared_methods,
    heavy_work,
    large_run,
    query_block,
    queue_ready_jobs,
    quick_method,
    ready_jobs,
)
from attribution_core.jobs.worker import LANES, Courtesy, _Runs, execute, lane_busy, waiting_marker, work
from attribution_core.progress import RemainingTime
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace


def spec(name: str = "a", priority: int = INTERACTIVE, kind: str = "fake") -> JobSpec:
    return JobSpec(kind, "run", "created", {"name": name}, title=f"job {name}", priority=priority)


@pytest.fixture
def queue(tmp_path) -> JobQueue:
    return JobQueue(tmp_path)


@pytest.fixture
def workspace(demo_workspace, tmp_path) -> Workspace:
    """A private copy of the tiny demo workspace."""
    shutil.copytree(demo_workspace.root, tmp_path / "workspace")
    return Workspace(tmp_path / "workspace")


def test_the_same_work_asked_twice_is_one_job_whose_priority_can_only_rise(queue):
    first = queue.submit(spec("a", PREFETCH))
    again = queue.submit(spec("a", INTERACTIVE))
    assert first.key == again.key and len(queue.jobs()) == 1
    assert again.state == QUEUED and again.spec.priority == INTERACTIVE
    assert queue.submit(spec("a", PREFETCH)).spec.priority == INTERACTIVE


def test_a_job_key_depends_on_the_run_creation_time_and_parameters():
    assert spec("a").key != spec("b").key
    assert spec("a").key != JobSpec("fake", "run", "retrained later", {"name": "a"}).key


def test_claims_go_most_urgent_first_then_oldest_and_never_twice(queue):
    for name, priority in [("late", PREFETCH), ("asked", REQUESTED), ("waited on", INTERACTIVE), ("waited on too", INTERACTIVE)]:
        queue.submit(spec(name, priority))
    claimed = []
    lock = threading.Lock()

    def claim_all():
        while (job := queue.claim(PREFETCH, os.getpid())) is not None:
            with lock:
                claimed.append(job.spec.params["name"])

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(["late", "asked", "waited on", "waited on too"])
    assert all(job.state == RUNNING for job in queue.jobs())


def test_the_interactive_lane_takes_only_jobs_a_page_waits_on(queue):
    queue.submit(spec("ground truth", REQUESTED))
    assert queue.claim(INTERACTIVE, os.getpid()) is None
    queue.submit(spec("score block", INTERACTIVE))
    assert queue.claim(INTERACTIVE, os.getpid()).spec.params["name"] == "score block"


def test_the_background_lane_leaves_a_fresh_click_to_the_interactive_lane_for_a_while(queue):
    leave = (INTERACTIVE, 0.5)
    prefetch = queue.submit(spec("map", PREFETCH))
    click = queue.submit(spec("score block", INTERACTIVE))
    assert not queue.more_urgent_waiting(PREFETCH, PREFETCH, leave_fresh=leave)
    assert queue.claim(PREFETCH, os.getpid(), leave_fresh=leave).key == prefetch.key  # the click waits for its own lane
    time.sleep(0.6)
    assert queue.more_urgent_waiting(PREFETCH, PREFETCH, leave_fresh=leave)
    assert queue.claim(PREFETCH, os.getpid(), leave_fresh=leave).key == click.key  # its lane is busy: taken after all


def test_cancel_stops_a_queued_job_at_once_and_flags_a_running_one(queue):
    waiting = queue.submit(spec("waiting"))
    running = queue.submit(spec("running"))
    queue.claim(INTERACTIVE, os.getpid())  # the older one
    queue.cancel(waiting.key)
    queue.cancel(running.key)
    assert queue.get(waiting.key).state == RUNNING and queue.report(waiting.key, 1, 2)  # running: told at its next report
    assert queue.get(running.key).state == CANCELLED


def test_a_finished_job_is_queued_again_when_asked_for_again(queue):
    job = queue.submit(spec())
    queue.claim(INTERACTIVE, os.getpid())
    queue.report(job.key, 3, 4)
    queue.finish(job.key, FAILED, "disk full")
    again = queue.submit(spec())
    assert (again.state, again.done, again.error) == (QUEUED, 0, None)


def test_running_jobs_of_a_dead_worker_are_queued_again(queue):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job = queue.submit(spec())
    queue.claim(INTERACTIVE, gone.pid)
    assert queue.requeue_stale() == [job.key]
    assert queue.get(job.key).state == QUEUED
    queue.claim(INTERACTIVE, os.getpid())
    assert queue.requeue_stale() == [] and queue.get(job.key).state == RUNNING  # this process is alive and beating


def test_the_time_left_is_the_workers_estimate_counting_down_between_reports(queue):
    job = queue.submit(spec())
    queue.claim(INTERACTIVE, os.getpid())
    queue.report(job.key, 1, 4)
    assert queue.get(job.key).remaining() is None and queue.get(job.key).fraction == 0.25  # no estimate yet: none shown
    queue.report(job.key, 2, 4, finish=1000.0, note="next phase: estimated again")
    running = queue.get(job.key)
    assert running.remaining(now=970.0) == 30 and running.remaining(now=990.0) == 10 and running.remaining(now=1010.0) == 0
    assert running.estimate_note == "next phase: estimated again"
    queue.requeue(job.key)
    assert queue.claim(INTERACTIVE, os.getpid()).remaining() is None  # a new attempt estimates anew


STEP_TIMES = {
    "slow start (a compilation), then steady": [8.0] + [1.0] * 40,
    "faster and faster": [3.0 - 2.5 * step / 60 for step in range(60)],
    "alternating fast and slow": [0.5, 2.0] * 25,
    "a little slower at the end": [1.0] * 30 + [1.1] * 20,
}


def estimates_of(step_times: list[float], *, looks_per_step: int = 4) -> list[float | None]:
    """The time left a page would read, looking several times during each step of a job with these step times."""
    estimate, now, seen = RemainingTime(), 0.0, []
    total = len(step_times)
    estimate.feed(0, total, now)
    for done, seconds in enumerate(step_times, start=1):
        for _ in range(looks_per_step):
            now += seconds / looks_per_step
            seen.append(estimate.remaining(now))
        estimate.feed(done, total, now)
        seen.append(estimate.remaining(now))
    return seen


@pytest.mark.parametrize("profile", STEP_TIMES)
def test_time_left_never_grows_while_a_job_keeps_a_pace_and_ends_at_zero(profile):
    seen = [seconds for seconds in estimates_of(STEP_TIMES[profile]) if seconds is not None]
    assert seen, "an estimate is given once a few steps are seen"
    assert all(later <= earlier for earlier, later in zip(seen, seen[1:]))
    assert seen[-1] == 0


def test_no_estimate_from_the_first_steps_alone():
    assert estimates_of([5.0] * 10)[:4 * 2] == [None] * 8  # two steps seen: still none


def test_a_job_slower_than_any_pace_seen_is_estimated_again_with_a_note():
    estimate, now = RemainingTime(), 0.0
    estimate.feed(0, 20, now)
    for done in range(1, 11):  # 1 s a step
        now += 1.0
        estimate.feed(done, 20, now)
    first_finish = estimate.finish
    assert first_finish == pytest.approx(10 + 10 * 1.0 * RemainingTime.MARGIN)
    for done in range(11, 17):  # then 10 s a step: the finish passes with steps left
        now += 10.0
        estimate.feed(done, 20, now)
    assert estimate.note == RemainingTime.SLOWER  # the one time it grows, and it says so
    assert estimate.remaining(now) == pytest.approx(4 * 10.0 * RemainingTime.MARGIN)  # from the pace since


def test_a_new_phase_starts_the_estimate_over_with_a_note():
    estimate = RemainingTime()
    for done in range(0, 6):
        estimate.feed(done, 5, float(done))
    assert estimate.remaining(5.0) == 0 and estimate.note is None
    estimate.feed(0, 100, 6.0)
    assert estimate.remaining(6.0) is None and estimate.note == RemainingTime.NEXT_PHASE


def test_a_job_whose_step_times_change_reports_a_time_left_that_never_grows_and_ends_at_zero(monkeypatch, tmp_path, queue):
    """Driven through a worker on a fake clock: the estimate the queue holds, read as a page reads it, after every report."""
    clock = {"now": 1_000.0}
    step_times = [6.0, 4.0] + [1.0] * 10 + [0.5] * 20 + [1.5] * 8  # a slow start, faster, faster, then a little slower
    seen: list[float] = []

    def run(run_, params, progress):
        total = len(step_times)
        progress(0, total)
        for done, seconds in enumerate(step_times, start=1):
            clock["now"] += seconds / 2
            row = queue.get(job.key)
            seen.append(row.remaining(now=clock["now"]))  # a page looking in the middle of a step
            clock["now"] += seconds / 2
            progress(done, total)
            seen.append(queue.get(job.key).remaining(now=clock["now"]))

    monkeypatch.setitem(kinds.KINDS, "fake", JobKind("fake", run, lambda run_, params: None, "a fake"))
    monkeypatch.setattr("attribution_core.jobs.worker._Runs.target", lambda self, job: None)
    monkeypatch.setattr("attribution_core.jobs.worker.REPORT_SECONDS", 0.0)
    monkeypatch.setattr("attribution_core.jobs.worker.clock", lambda: clock["now"])
    job = queue.submit(spec())
    work(tmp_path, "background", until_empty=True)
    estimated = [seconds for seconds in seen if seconds is not None]
    assert seen[0] is None and len(estimated) > len(step_times)  # none from the first steps, then one at every look
    assert all(later <= earlier for earlier, later in zip(estimated, estimated[1:])), estimated
    assert estimated[-1] == 0 and queue.get(job.key).state == DONE


def fake_kinds(monkeypatch, log: list, *, stop_after: int | None = None, fail: Exception | None = None, resumable: bool = False):
    """Register a 'fake' kind whose run reports four steps (logged), optionally failing or pausing."""

    def run(run_, params, progress):
        for step in range(1, 5):
            log.append((params["name"], step))
            if fail is not None:
                raise fail
            progress(step, 4)

    monkeypatch.setitem(kinds.KINDS, "fake", JobKind("fake", run, lambda run_, params: None, "a fake", resumable=resumable))
    monkeypatch.setattr("attribution_core.jobs.worker._Runs.target", lambda self, job: None)
    monkeypatch.setattr("attribution_core.jobs.worker.REPORT_SECONDS", 0.0)


def test_a_worker_runs_the_queue_and_records_each_end(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log)
    first, second = queue.submit(spec("first")), queue.submit(spec("second", PREFETCH))
    assert work(tmp_path, "background", until_empty=True) == 2
    assert [name for name, _ in log] == ["first"] * 4 + ["second"] * 4
    assert {queue.get(first.key).state, queue.get(second.key).state} == {DONE}
    assert (queue.get(first.key).done, queue.get(first.key).total) == (4, 4)


def test_a_failing_job_keeps_its_message_and_the_worker_goes_on(monkeypatch, tmp_path, queue):
    fake_kinds(monkeypatch, [], fail=SettingsError("k=0 removes nothing"))
    job = queue.submit(spec())
    work(tmp_path, "background", until_empty=True)
    failed = queue.get(job.key)
    assert (failed.state, failed.error) == (FAILED, "k=0 removes nothing")
    assert not failed.retryable  # the same settings fail the same way: a page offers no 'Try again'


@pytest.mark.parametrize("error", [WorkspaceError("disk full while writing x: free space and run again"), ZeroDivisionError("bug")])
def test_a_job_that_may_succeed_later_stays_retryable(monkeypatch, tmp_path, queue, error):
    fake_kinds(monkeypatch, [], fail=error)
    job = queue.submit(spec())
    work(tmp_path, "background", until_empty=True)
    assert queue.get(job.key).state == FAILED and queue.get(job.key).retryable


def test_a_queue_made_before_failures_said_whether_to_retry_opens_and_gains_the_column(tmp_path):
    with sqlite3.connect(tmp_path / "jobs.sqlite") as connection:  # the table as it was, without `retryable`
        connection.executescript(OLD_SCHEMA)
        connection.execute("INSERT INTO jobs (key, kind, run_id, run_created, params, title, priority, state, submitted, error) "
                           "VALUES ('k', 'fit', 'r', '', '{}', 'old', 1, 'failed', 0, 'it failed')")
    (old,) = JobQueue(tmp_path).jobs()
    assert old.state == FAILED and old.error == "it failed" and old.retryable


OLD_SCHEMA = """
CREATE TABLE jobs (key TEXT PRIMARY KEY, kind TEXT NOT NULL, run_id TEXT NOT NULL, run_created TEXT NOT NULL, params TEXT NOT NULL,
    title TEXT NOT NULL, priority INTEGER NOT NULL, state TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0, submitted REAL NOT NULL, started REAL, finished REAL, heartbeat REAL, worker_pid INTEGER,
    cancel INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, error TEXT);
"""
"""jobs.sqlite's table before failures said whether a retry may succeed."""


def test_a_bug_in_a_job_is_reported_as_an_internal_error(monkeypatch, tmp_path, queue):
    fake_kinds(monkeypatch, [], fail=ZeroDivisionError("division by zero"))
    job = queue.submit(spec())
    work(tmp_path, "background", until_empty=True)
    assert queue.get(job.key).error == "Internal error: ZeroDivisionError: division by zero"


def test_a_job_of_a_kind_this_version_does_not_know_fails_with_the_reason_and_the_worker_goes_on(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log)
    unknown = queue.submit(spec("from a newer tdx", kind="vibes"))
    known = queue.submit(spec("known", PREFETCH))
    assert work(tmp_path, "background", until_empty=True) == 2
    failed = queue.get(unknown.key)
    assert failed.state == FAILED and failed.error.startswith("unknown job kind 'vibes': this version of tdx cannot run it; kinds: ")
    assert queue.get(known.key).state == DONE and {name for name, _ in log} == {"known"}


def test_a_cancelled_running_job_stops_at_its_next_report(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log)
    job = queue.submit(spec())
    original = JobQueue.report

    def report_then_cancel(self, key, done, total, **estimate):
        if done == 2:
            self.cancel(key)
        return original(self, key, done, total, **estimate)

    monkeypatch.setattr(JobQueue, "report", report_then_cancel)
    work(tmp_path, "background", until_empty=True)
    assert queue.get(job.key).state == CANCELLED and log == [("a", 1), ("a", 2)]


def test_a_resumable_job_yields_to_a_more_urgent_one_and_resumes_after_it(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log, resumable=True)
    long_job = queue.submit(spec("ground truth", PREFETCH))
    original = JobQueue.report

    def report_and_ask(self, key, done, total, **estimate):
        if key == long_job.key and done == 2 and not any(name == "click" for name, _ in log):
            self.submit(spec("click", INTERACTIVE))
        return original(self, key, done, total, **estimate)

    monkeypatch.setattr(JobQueue, "report", report_and_ask)
    work(tmp_path, "background", until_empty=True)
    names = [name for name, _ in log]
    assert names[:2] == ["ground truth"] * 2 and names[2:6] == ["click"] * 4 and names[6:] == ["ground truth"] * 4
    assert queue.get(long_job.key).state == DONE


def claimed_background_job_beside_a_page_job(tmp_path, queue) -> tuple:
    """A page's job running in the interactive lane (claimed by another worker), and a prefetch job claimed by the background lane."""
    page_job = queue.submit(spec("page", INTERACTIVE))
    assert queue.claim(INTERACTIVE, worker_pid=1).key == page_job.key
    queue.submit(spec("prefetch", PREFETCH))
    return page_job, queue.claim(PREFETCH, worker_pid=2)


def test_a_background_job_pauses_while_a_page_job_runs_and_its_time_left_holds_still(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log)
    page_job, background = claimed_background_job_beside_a_page_job(tmp_path, queue)
    notes: list = []
    original = JobQueue.report

    def report(self, key, done, total, **estimate):
        notes.append(estimate.get("note"))
        return original(self, key, done, total, **estimate)

    monkeypatch.setattr(JobQueue, "report", report)
    threading.Timer(0.6, queue.finish, args=(page_job.key, DONE)).start()
    started = time.monotonic()
    assert execute(queue, background, _Runs(tmp_path), LANES["background"], courtesy=True) == DONE
    assert time.monotonic() - started >= 0.5, "it waited for the page's job to end"
    assert RemainingTime.PAUSED in notes and log == [("prefetch", step) for step in range(1, 5)]


def test_a_pause_for_one_page_job_is_bounded_and_taken_once(monkeypatch, tmp_path, queue):
    """The page's job may wait on a lock the paused job holds: the pause ends, and that job does not pause it again."""
    monkeypatch.setattr("attribution_core.jobs.worker.COURTESY_SECONDS", 0.3)
    monkeypatch.setattr("attribution_core.jobs.worker.REPORT_SECONDS", 0.0)
    page_job, background = claimed_background_job_beside_a_page_job(tmp_path, queue)
    courtesy, waits = Courtesy(queue, background.key, waiting_marker(tmp_path)), []
    first = courtesy.pause(waits.append)
    assert 0.3 <= first < 2.0 and waits and queue.get(page_job.key).state == RUNNING
    assert courtesy.pause(waits.append) == 0.0


def test_a_pause_ends_when_the_page_job_waits_for_a_lock_the_paused_job_may_hold(monkeypatch, tmp_path, queue):
    """The interactive lane's worker marks its waits for a lock (store.lock_wait_listeners): no pause then, and one ends."""
    _, background = claimed_background_job_beside_a_page_job(tmp_path, queue)
    marker = waiting_marker(tmp_path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    threading.Timer(0.3, marker.touch).start()
    assert 0.2 < Courtesy(queue, background.key, marker).pause(lambda waited: None) < 5.0
    assert Courtesy(queue, background.key, marker).pause(lambda waited: None) == 0.0, "none while the marker is there"


def test_a_wait_for_an_artifact_lock_is_told_to_the_listeners(monkeypatch, tmp_path):
    import fcntl

    from attribution_core import store

    heard: list[bool] = []
    monkeypatch.setattr(store, "lock_wait_listeners", [heard.append])
    path = tmp_path / ".artifact.lock"
    with store.file_lock(path):
        pass
    assert heard == [], "a free lock is taken without a wait"
    with open(path, "a+") as holder:  # another open file description holds it, as another process would
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        threading.Timer(0.3, fcntl.flock, args=(holder.fileno(), fcntl.LOCK_UN)).start()
        with store.file_lock(path):
            assert heard == [True, False]


def test_a_job_pages_wait_on_and_a_job_outside_the_courtesy_do_not_pause(monkeypatch, tmp_path, queue):
    log: list = []
    fake_kinds(monkeypatch, log)
    monkeypatch.setattr("attribution_core.jobs.worker.COURTESY_SECONDS", 30.0)
    _, background = claimed_background_job_beside_a_page_job(tmp_path, queue)
    started = time.monotonic()
    assert execute(queue, background, _Runs(tmp_path), LANES["background"], courtesy=False) == DONE
    assert time.monotonic() - started < 5.0
    second_page_job = queue.submit(spec("second page", INTERACTIVE))
    assert queue.claim(INTERACTIVE, worker_pid=2).key == second_page_job.key
    started = time.monotonic()
    assert execute(queue, second_page_job, _Runs(tmp_path), LANES["background"], courtesy=True) == DONE
    assert time.monotonic() - started < 5.0, "a page's job claimed by the background lane waits for no other"


def test_a_paused_estimate_moves_its_finish_by_the_pause_with_a_note():
    estimate = RemainingTime()
    for done, now in enumerate([0.0, 1.0, 2.0, 3.0, 4.0]):
        estimate.feed(done, 10, now)
    before = estimate.remaining(4.0)
    estimate.paused(7.0)
    assert estimate.remaining(11.0) == pytest.approx(before) and estimate.note == RemainingTime.PAUSED
    estimate.feed(5, 10, 12.0)  # the pace goes on as before the pause
    assert estimate.remaining(12.0) <= before - 1.0, "and the time left counts down from where it held"


def test_one_worker_per_lane_and_workspace(tmp_path):
    done = threading.Event()
    results = {}

    def hold_lane():
        results["first"] = work(tmp_path, "interactive", idle_exit=8.0)
        done.set()

    thread = threading.Thread(target=hold_lane)
    thread.start()
    deadline = time.monotonic() + 30
    # the worker opens the queue once it holds its lock (polling lane_busy instead would hold the lock for a moment
    # itself, and a worker starting in that moment finds the lane served and returns)
    while not (tmp_path / "jobs.sqlite").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lane_busy(tmp_path, "interactive") and not lane_busy(tmp_path, "background")
    assert work(tmp_path, "interactive", until_empty=True) == 0  # the lane is served already
    thread.join()
    assert not lane_busy(tmp_path, "interactive")


def test_the_interactive_lane_gets_a_run_ready_in_steps_a_page_job_can_come_between(workspace):
    runs = _Runs(workspace.root)
    steps = runs.warming("fmnist-mlp")
    assert next(steps) and runs.cache["fmnist-mlp"]._datasets is None, "the run is open, its data not yet loaded"
    assert next(steps) and runs.cache["fmnist-mlp"]._datasets is not None
    list(steps)
    assert list(runs.warming("no-such-run")) == [], "a run that does not open is skipped"


def test_score_and_fit_jobs_store_what_the_front_door_then_loads(workspace):
    run = load_run(workspace, "fmnist-mlp")
    fit, block = fit_job(run, "trak"), scores_job(run, "trak", query_block(40, 100))
    assert block.params["queries"] == list(range(32, 64))
    assert load_result(run, fit) is None and load_result(run, block) is None
    queue = JobQueue(workspace.root)
    queue.submit(fit)
    queue.submit(block)
    assert work(workspace.root, "background", until_empty=True) == 2
    assert load_result(run, fit) is True
    stored = load_result(run, block)
    direct = attribute(run, "trak", queries=list(range(32, 64)))
    assert stored.values.shape == (32, 600) and (stored.values == direct.values).all()
    assert stored.self_influence is not None and stored.key == direct.key


def test_a_job_queued_under_a_kinds_former_name_runs_and_loads_as_that_kind(workspace):
    run = load_run(workspace, "fmnist-mlp")
    last = len(run.checkpoints) - 1
    # the row an older tdx left in jobs.sqlite: find-similar's job was named "features"
    former = JobSpec("features", run.run_id, run.created, {"checkpoint": last}, "Find similar: features of checkpoint 3")
    queue = JobQueue(workspace.root)
    job = queue.submit(former)
    assert load_result(run, former) is None
    assert work(workspace.root, "background", until_empty=True) == 1 and queue.get(job.key).state == DONE
    index = load_result(run, representations_job(run, -1))
    assert index is not None and index.checkpoint == last
    assert (load_result(run, former).train == index.train).all()


def test_stored_scores_compute_nothing(workspace, monkeypatch):
    run = load_run(workspace, "fmnist-mlp")
    assert stored_scores(run, "tracin", queries=[0, 1]) is None
    computed = attribute(run, "tracin", queries=[0, 1])
    monkeypatch.setattr("attribution_core.api.prepare", lambda *args, **kwargs: pytest.fail("stored scores were recomputed"))
    again = attribute(run, "tracin", queries=[0, 1])
    assert (again.values == computed.values).all() and again.notes == computed.notes and again.query_names == ["test 0", "test 1"]


def test_a_killed_worker_loses_no_finished_retraining_and_the_next_one_resumes(workspace):
    run = load_run(workspace, "fmnist-mlp-early")
    settings = LdsSettings(n_subsets=6)
    queue = JobQueue(workspace.root)
    job = queue.submit(groundtruth_job(run, settings))
    worker = subprocess.Popen([sys.executable, "-m", "attribution_core.jobs.worker", "--workspace", str(workspace.root)])
    try:
        deadline = time.monotonic() + 120
        while groundtruth_status(run, settings)[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
    finished_before, _ = groundtruth_status(run, settings)
    state = queue.get(job.key).state  # RUNNING, unless the kill came after the last retraining was merged
    assert 2 <= finished_before and state in (RUNNING, DONE)
    assert queue.requeue_stale() == ([job.key] if state == RUNNING else [])
    work(workspace.root, "background", until_empty=True)
    assert queue.get(job.key).state == DONE and load_groundtruth(run, settings).margins.shape == (6, 100)


def test_a_run_is_large_by_its_training_set_times_its_parameters(workspace, monkeypatch):
    run = load_run(workspace, "fmnist-noisy")
    work_ = len(run.datasets()[0]) * run.metrics["n_parameters"]
    assert not large_run(run) and work_ < LARGE_RUN_WORK
    monkeypatch.setattr("attribution_core.jobs.ready.LARGE_RUN_WORK", work_)
    assert large_run(run) and quick_method(run) == "repsim"
    assert heavy_work(run, "trak", fitted=False) and not heavy_work(run, "trak", fitted=True)  # a TRAK block is one product
    assert heavy_work(run, "tracin", fitted=True) and not heavy_work(run, "repsim", fitted=False)  # exact TracIn streams


def test_a_large_runs_ready_jobs_are_cheap_first_and_queue_no_block_that_streams(workspace, monkeypatch):
    monkeypatch.setattr("attribution_core.jobs.ready.LARGE_RUN_WORK", 0)
    run = load_run(workspace, "fmnist-noisy")
    specs = ready_jobs(run, with_groundtruth=True)
    steps = [(spec_.kind, spec_.params.get("method")) for spec_ in specs]
    assert steps == [("fit", "repsim"), ("scores", "repsim"), ("layout", None), ("ranking", None), ("representations", None),
                     ("fit", "trak"), ("scores", "trak")]  # the heavy fit after every forward pass; no ground truth, no TracIn
    assert compared_methods(run) == ["trak", "repsim"]


def test_ready_jobs_cover_what_the_first_pages_open_with(workspace):
    run = load_run(workspace, "fmnist-noisy")
    specs = ready_jobs(run, with_groundtruth=True)
    kinds_queued = [spec_.kind for spec_ in specs]
    assert kinds_queued[:4] == ["fit", "scores", "layout", "ranking"] and kinds_queued[-1] == "groundtruth"
    lds_blocks = [spec_.params["queries"] for spec_ in specs if spec_.kind == "scores"][1:]
    assert lds_blocks == 2 * blocks_covering(LDS_QUERIES, 100)  # the two compared methods, first LDS_QUERIES samples
    assert all(len(block) <= QUERY_BLOCK for block in lds_blocks)
    without = ready_jobs(run)  # no ground truth: Compare shows only the first query's proponents, so only its block
    first_block = specs[1].params["queries"]
    assert [spec_.params["queries"] for spec_ in without if spec_.kind == "scores"] == 3 * [first_block]
    rows = queue_ready_jobs(workspace, [run])
    assert len(rows) == len({spec_.key for spec_ in without}) and all(row.spec.priority == PREFETCH for row in rows)
