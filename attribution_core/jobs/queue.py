"""The workspace's job queue: long work (fits, score blocks, ground truths, maps) waiting for, or done by, a worker.

One SQLite table, jobs.sqlite beside the runs, shared by every process that opens the workspace:
the app's pages submit jobs and read their progress, workers (worker.py) claim and run them, the
CLI lists them. A job is keyed by what it computes (its kind, run and parameters), so asking twice
for the same work finds the job already queued, running or done instead of starting it again, from
a second browser tab or after a page reload. The job's result is never in the queue: it is the
atomic artifact the core call stores, so a killed worker loses at most the work in progress, and a
restarted one resumes from what was stored.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..store import content_key

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINISHED = (DONE, FAILED, CANCELLED)

INTERACTIVE, REQUESTED, PREFETCH = 0, 1, 2
"""Priorities, most urgent first: a page waits on it (a score block, the fit it needs); a user asked for long work
(a ground truth, a counterfactual retrain); queued ahead of need (the jobs the first pages will ask for)."""

STALE_SECONDS = 30.0
"""A running job whose worker has not reported for this long (or whose worker process is gone) is queued again."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    run_id TEXT NOT NULL,
    run_created TEXT NOT NULL,
    params TEXT NOT NULL,
    title TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    worker_pid INTEGER,
    cancel INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    retryable INTEGER NOT NULL DEFAULT 1,
    finish REAL,
    estimate_note TEXT
);
CREATE INDEX IF NOT EXISTS jobs_waiting ON jobs (state, priority, submitted);
"""


_CLAIMABLE = "state = ? AND priority <= ? AND (priority > ? OR submitted <= ?)"
"""Queued, within the worker's priorities, and not a fresh job left to another worker (parameters: _claimable)."""


def _claimable(max_priority: int, leave_fresh: tuple[int, float] | None, now: float) -> tuple:
    fresh_priority, fresh_seconds = leave_fresh or (-1, 0.0)
    return QUEUED, max_priority, fresh_priority, now - fresh_seconds


@dataclass(frozen=True)
class JobSpec:
    """What a job computes: its kind (kinds.KINDS), the run it is about (id and creation time) and JSON parameters."""

    kind: str
    run_id: str
    run_created: str
    params: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""
    """How the job is named on a page and in `tdx jobs` ("TRAK: fit on 3,000 training examples")."""
    priority: int = INTERACTIVE

    @property
    def key(self) -> str:
        """The job's identity: the same work has the same key, whoever asks for it."""
        return content_key({"job": self.kind, "run": self.run_id, "created": self.run_created, "params": dict(self.params)})


@dataclass(frozen=True)
class Job:
    """A row of the queue: the spec, its state and its progress."""

    key: str
    spec: JobSpec
    state: str
    done: int
    total: int
    submitted: float
    started: float | None
    finished: float | None
    heartbeat: float | None
    worker_pid: int | None
    cancel_requested: bool
    attempts: int
    error: str | None
    retryable: bool = True
    """For a failed job: whether running it again may succeed (errors.TdxError.retryable of what it raised)."""
    finish: float | None = None
    """When a running job should be done (time.time()), as its worker estimates it (progress.RemainingTime); None before an estimate."""
    estimate_note: str | None = None
    """Why the estimate was made again (a new phase, slower than estimated), or None."""

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (0 until the job reports a total)."""
        return min(1.0, self.done / self.total) if self.total else 0.0

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the job started (0 while queued); its duration once finished."""
        if self.started is None:
            return 0.0
        return (self.finished or now or time.time()) - self.started

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left as the worker estimated them (counting down between its reports; 0 once past), or None without an estimate.

        Never more than at the previous look while the job keeps the pace it had (progress.RemainingTime).
        """
        if self.state != RUNNING or self.finish is None:
            return None
        return max(0.0, self.finish - (now or time.time()))


class JobQueue:
    """The workspace's jobs.sqlite: submit, claim, report, cancel and list jobs (safe across processes and threads)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.path = self.root / "jobs.sqlite"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: cheap, and never shared between the threads of a Streamlit server.
        self.root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")
            connection.executescript(_SCHEMA)
            _add_missing_columns(connection)
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")  # one writer at a time: a claim is never given to two workers
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

    def submit(self, spec: JobSpec) -> Job:
        """Queue the spec's work unless it is queued or running already (then only its priority may rise); returns its row.

        A finished row (done, failed or cancelled) is queued again: the caller asks only when it
        needs the work and found no stored result.
        """
        if not spec.kind or not spec.run_id:
            raise SettingsError("a job needs a kind and a run")
        now = time.time()
        with self._transaction() as connection:
            row = connection.execute("SELECT state, priority FROM jobs WHERE key = ?", (spec.key,)).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO jobs (key, kind, run_id, run_created, params, title, priority, state, submitted) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (spec.key, spec.kind, spec.run_id, spec.run_created, json.dumps(dict(spec.params), sort_keys=True),
                     spec.title or spec.kind, spec.priority, QUEUED, now))
            elif row["state"] in ACTIVE:
                connection.execute("UPDATE jobs SET priority = MIN(priority, ?) WHERE key = ?", (spec.priority, spec.key))
            else:
                connection.execute(
                    "UPDATE jobs SET state = ?, priority = ?, submitted = ?, started = NULL, finished = NULL, done = 0, "
                    "total = 0, cancel = 0, error = NULL, worker_pid = NULL, heartbeat = NULL WHERE key = ?",
                    (QUEUED, spec.priority, now, spec.key))
        return self.get(spec.key)

    def get(self, key: str) -> Job | None:
        """The job with this key, or None when it was never submitted."""
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, *, run_id: str | None = None, states: tuple[str, ...] | None = None) -> list[Job]:
        """Jobs, most urgent and oldest first (optionally of one run, in some states)."""
        clauses, values = [], []
        if run_id is not None:
            clauses.append("run_id = ?")
            values.append(run_id)
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            values.extend(states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as connection:
            rows = connection.execute(f"SELECT * FROM jobs {where} ORDER BY priority, submitted", values).fetchall()  # noqa: S608 (placeholders only)
        return [_job(row) for row in rows]

    def claim(self, max_priority: int, worker_pid: int, *, leave_fresh: tuple[int, float] | None = None) -> Job | None:
        """The most urgent queued job of priority <= max_priority, now running under worker_pid; None when none waits.

        leave_fresh: (priority, seconds): jobs of at most that priority submitted less than `seconds` ago are left to
        another worker (the background lane leaves a click's job to the interactive one, which holds the run loaded).
        """
        now = time.time()
        with self._transaction() as connection:
            row = connection.execute(
                f"SELECT key FROM jobs WHERE {_CLAIMABLE} ORDER BY priority, submitted LIMIT 1",  # noqa: S608 (a constant)
                _claimable(max_priority, leave_fresh, now)).fetchone()
            if row is None:
                return None
            connection.execute(
                "UPDATE jobs SET state = ?, started = COALESCE(started, ?), heartbeat = ?, worker_pid = ?, "
                "attempts = attempts + 1, finish = NULL, estimate_note = NULL WHERE key = ?", (RUNNING, now, now, worker_pid, row["key"]))
        return self.get(row["key"])

    def report(self, key: str, done: int, total: int, *, finish: float | None = None, note: str | None = None) -> bool:
        """Record a running job's progress (and when it should be done, time.time(), with why that changed).

        Returns whether a cancel was requested.
        """
        with self._connect() as connection:
            connection.execute("UPDATE jobs SET done = ?, total = ?, heartbeat = ?, finish = ?, estimate_note = ? "
                               "WHERE key = ? AND state = ?", (int(done), int(total), time.time(), finish, note, key, RUNNING))
            row = connection.execute("SELECT cancel FROM jobs WHERE key = ?", (key,)).fetchone()
        return bool(row and row["cancel"])

    def beat(self, key: str) -> None:
        """The worker of a running job is alive (between progress reports)."""
        with self._connect() as connection:
            connection.execute("UPDATE jobs SET heartbeat = ? WHERE key = ? AND state = ?", (time.time(), key, RUNNING))

    def more_urgent_waiting(self, priority: int, max_priority: int, *, leave_fresh: tuple[int, float] | None = None) -> bool:
        """Whether a queued job more urgent than `priority` that this worker would claim (see claim) is waiting."""
        with self._connect() as connection:
            row = connection.execute(f"SELECT 1 FROM jobs WHERE {_CLAIMABLE} AND priority < ? LIMIT 1",  # noqa: S608 (a constant)
                                     (*_claimable(max_priority, leave_fresh, time.time()), priority)).fetchone()
        return row is not None

    def finish(self, key: str, state: str, error: str | None = None, *, retryable: bool = True) -> None:
        """End a running job: done, failed (with the message a user reads, and whether a retry may succeed) or cancelled."""
        if state not in FINISHED:
            raise ValueError(f"not a finished state: {state}")
        with self._connect() as connection:
            connection.execute("UPDATE jobs SET state = ?, finished = ?, error = ?, retryable = ?, worker_pid = NULL WHERE key = ?",
                               (state, time.time(), error, int(retryable), key))

    def running_keys(self, max_priority: int) -> set[str]:
        """Keys of the running jobs of priority <= max_priority (INTERACTIVE: the jobs pages wait on)."""
        with self._connect() as connection:
            rows = connection.execute("SELECT key FROM jobs WHERE state = ? AND priority <= ?", (RUNNING, max_priority)).fetchall()
        return {row["key"] for row in rows}

    def requeue(self, key: str) -> None:
        """Put a running job back in the queue (its worker stops, or yields to a more urgent job); what it stored is kept."""
        with self._connect() as connection:
            connection.execute("UPDATE jobs SET state = ?, worker_pid = NULL WHERE key = ? AND state = ?", (QUEUED, key, RUNNING))

    def cancel(self, key: str) -> None:
        """Ask for a job to stop: a queued one is cancelled at once, a running one when its worker next reports progress."""
        with self._transaction() as connection:
            connection.execute("UPDATE jobs SET state = ?, finished = ? WHERE key = ? AND state = ?",
                               (CANCELLED, time.time(), key, QUEUED))
            connection.execute("UPDATE jobs SET cancel = 1 WHERE key = ? AND state = ?", (key, RUNNING))

    def requeue_stale(self, now: float | None = None) -> list[str]:
        """Queue again the running jobs whose worker is gone (killed server, crash); returns their keys."""
        now = now or time.time()
        with self._transaction() as connection:
            rows = connection.execute("SELECT key, worker_pid, heartbeat FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            stale = [row["key"] for row in rows
                     if not _alive(row["worker_pid"]) or (row["heartbeat"] or 0) < now - STALE_SECONDS]
            for key in stale:
                connection.execute("UPDATE jobs SET state = ?, worker_pid = NULL WHERE key = ?", (QUEUED, key))
        return stale

    def ahead(self, key: str) -> int:
        """How many jobs run or wait before this queued one (0 once it runs)."""
        with self._connect() as connection:
            row = connection.execute("SELECT state, priority, submitted FROM jobs WHERE key = ?", (key,)).fetchone()
            if row is None or row["state"] != QUEUED:
                return 0
            return connection.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? OR (state = ? AND (priority < ? OR (priority = ? AND submitted < ?)))",
                (RUNNING, QUEUED, row["priority"], row["priority"], row["submitted"])).fetchone()[0]

    def typical_seconds(self, kind: str, run_id: str) -> float | None:
        """The median duration of this kind's finished jobs on this run (an estimate before a job reports progress)."""
        with self._connect() as connection:
            rows = connection.execute("SELECT finished - started AS seconds FROM jobs WHERE kind = ? AND run_id = ? AND state = ? "
                                      "AND started IS NOT NULL ORDER BY finished DESC LIMIT 9", (kind, run_id, DONE)).fetchall()
        seconds = sorted(row["seconds"] for row in rows)
        return seconds[len(seconds) // 2] if seconds else None


def _alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ADDED_COLUMNS = {"retryable": "INTEGER NOT NULL DEFAULT 1", "finish": "REAL", "estimate_note": "TEXT"}
"""Columns added after the table was first created: a jobs.sqlite made before them gets them on its next open."""


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    present = {row["name"] for row in connection.execute("PRAGMA table_info(jobs)")}
    for name, declaration in _ADDED_COLUMNS.items():
        if name not in present:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                connection.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")


def _job(row: sqlite3.Row) -> Job:
    spec = JobSpec(row["kind"], row["run_id"], row["run_created"], json.loads(row["params"]), row["title"], row["priority"])
    return Job(row["key"], spec, row["state"], row["done"], row["total"], row["submitted"], row["started"], row["finished"],
               row["heartbeat"], row["worker_pid"], bool(row["cancel"]), row["attempts"], row["error"], bool(row["retryable"]),
               row["finish"], row["estimate_note"])
