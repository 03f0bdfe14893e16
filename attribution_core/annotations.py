"""Flags on training examples, kept in the workspace's annotations.sqlite.

One row per (run, example): its kind (mislabeled, ambiguous, outlier, fine), an optional
suggested label and a note. SQLite in WAL mode with a busy timeout, so the app's sessions and
a CLI can write at once; every write commits before it returns, so a flag the user saw saved
survives a crash or a restart. Every change (one flag, or many at once) is one action in a
history table that keeps what it replaced, so the last action of a user can be undone, after a
restart too. Queries are parameterised; exported CSV cells are escaped against spreadsheet
formula injection.
"""
from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import SettingsError, WorkspaceError

FLAG_KINDS = ("mislabeled", "ambiguous", "outlier", "fine")
"""'fine' records a reviewed example that needs nothing; the others are flags."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    run_id TEXT NOT NULL,
    example_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('mislabeled', 'ambiguous', 'outlier', 'fine')),
    suggested_label INTEGER,
    note TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, example_id)
);
CREATE TABLE IF NOT EXISTS history (
    action_id INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    example_id INTEGER NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    previous_kind TEXT,
    previous_suggested_label INTEGER,
    previous_note TEXT,
    previous_updated_at TEXT,
    undone INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (action_id, example_id)
);
CREATE INDEX IF NOT EXISTS history_by_run ON history (run_id, undone, action_id);
"""


@dataclass(frozen=True)
class Flag:
    """A user's verdict on one training example of a run."""

    run_id: str
    example_id: int
    kind: str
    suggested_label: int | None = None
    note: str = ""
    updated_at: str = ""


class Annotations:
    """The flags store of a workspace (annotations.sqlite)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise WorkspaceError(f"cannot open annotations database {self.path}: {exc}") from exc

    @contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as connection:
            connection.execute("PRAGMA busy_timeout=30000")
            connection.execute("PRAGMA synchronous=FULL")
            with connection:
                if write:  # take the write lock before reading: two writers never number their actions alike
                    connection.execute("BEGIN IMMEDIATE")
                yield connection

    def set_flag(self, run_id: str, example_id: int, kind: str, *, suggested_label: int | None = None, note: str = "",
                 actor: str = "") -> Flag:
        """Save (or replace) the flag of one example; committed when this returns (one undoable action)."""
        suggested = None if suggested_label is None else {int(example_id): suggested_label}
        return self.set_flags(run_id, [example_id], kind, suggested_labels=suggested, note=note, actor=actor)[0]

    def set_flags(self, run_id: str, example_ids: list[int], kind: str, *, suggested_labels: Mapping[int, int] | None = None,
                  note: str = "", actor: str = "") -> list[Flag]:
        """Give many examples the same verdict at once: one transaction, one undoable action (actor: who, for undo).

        suggested_labels: per example id, the class it should have (a ranking's suggestion); ids it leaves out get none.
        """
        if kind not in FLAG_KINDS:
            raise SettingsError(f"flag kind {kind!r}: choose one of {', '.join(FLAG_KINDS)}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        suggested = {int(example_id): int(label) for example_id, label in (suggested_labels or {}).items()}
        flags = [Flag(run_id, example_id, kind, suggested.get(example_id), str(note), stamp)
                 for example_id in dict.fromkeys(int(example_id) for example_id in example_ids)]
        with self._connect(write=True) as connection:
            self._record(connection, run_id, [flag.example_id for flag in flags], actor)
            connection.executemany(
                "INSERT INTO flags (run_id, example_id, kind, suggested_label, note, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, example_id) DO UPDATE SET kind = excluded.kind, "
                "suggested_label = excluded.suggested_label, note = excluded.note, updated_at = excluded.updated_at",
                [(flag.run_id, flag.example_id, flag.kind, flag.suggested_label, flag.note, flag.updated_at) for flag in flags],
            )
        return flags

    def remove_flag(self, run_id: str, example_id: int, *, actor: str = "") -> None:
        """Forget the verdict on one example (one undoable action)."""
        with self._connect(write=True) as connection:
            self._record(connection, run_id, [int(example_id)], actor)
            connection.execute("DELETE FROM flags WHERE run_id = ? AND example_id = ?", (run_id, int(example_id)))

    @staticmethod
    def _record(connection: sqlite3.Connection, run_id: str, example_ids: list[int], actor: str) -> None:
        """Keep what a change is about to replace, as one new action of the history."""
        action = connection.execute("SELECT COALESCE(MAX(action_id), 0) + 1 FROM history").fetchone()[0]
        for example_id in example_ids:
            previous = connection.execute("SELECT kind, suggested_label, note, updated_at FROM flags WHERE run_id = ? AND example_id = ?",
                                          (run_id, example_id)).fetchone() or (None, None, None, None)
            connection.execute("INSERT INTO history (action_id, run_id, example_id, actor, previous_kind, previous_suggested_label, "
                               "previous_note, previous_updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (action, run_id, example_id, actor, *previous))

    def undo(self, run_id: str, *, actor: str | None = None) -> list[int]:
        """Undo the last action not yet undone on the run (of one actor, when given); returns the example ids it restored ([] if none)."""
        with self._connect(write=True) as connection:
            clause, values = ("AND actor = ?", (run_id, actor)) if actor is not None else ("", (run_id,))
            row = connection.execute(f"SELECT MAX(action_id) FROM history WHERE run_id = ? AND undone = 0 {clause}", values).fetchone()  # noqa: S608
            if row[0] is None:
                return []
            entries = connection.execute("SELECT example_id, previous_kind, previous_suggested_label, previous_note, previous_updated_at "
                                         "FROM history WHERE action_id = ?", (row[0],)).fetchall()
            for example_id, kind, suggested_label, note, updated_at in entries:
                if kind is None:
                    connection.execute("DELETE FROM flags WHERE run_id = ? AND example_id = ?", (run_id, example_id))
                else:
                    connection.execute("INSERT OR REPLACE INTO flags (run_id, example_id, kind, suggested_label, note, updated_at) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", (run_id, example_id, kind, suggested_label, note, updated_at))
            connection.execute("UPDATE history SET undone = 1 WHERE action_id = ?", (row[0],))
        return [int(entry[0]) for entry in entries]

    def can_undo(self, run_id: str, *, actor: str | None = None) -> int:
        """How many examples the next undo would restore (0: nothing to undo)."""
        with self._connect() as connection:
            clause, values = ("AND actor = ?", (run_id, actor)) if actor is not None else ("", (run_id,))
            row = connection.execute(f"SELECT MAX(action_id) FROM history WHERE run_id = ? AND undone = 0 {clause}", values).fetchone()  # noqa: S608
            if row[0] is None:
                return 0
            return connection.execute("SELECT COUNT(*) FROM history WHERE action_id = ?", (row[0],)).fetchone()[0]

    def undoable_actions(self, run_id: str, *, actor: str | None = None) -> int:
        """How many actions on the run (of one actor, when given) undo can still take back, one after the other."""
        with self._connect() as connection:
            clause, values = ("AND actor = ?", (run_id, actor)) if actor is not None else ("", (run_id,))
            return connection.execute(f"SELECT COUNT(DISTINCT action_id) FROM history WHERE run_id = ? AND undone = 0 {clause}",  # noqa: S608
                                      values).fetchone()[0]

    def flags(self, run_id: str) -> dict[int, Flag]:
        """Every verdict of a run, by example id."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT run_id, example_id, kind, suggested_label, note, updated_at FROM flags WHERE run_id = ? ORDER BY example_id",
                (run_id,),
            ).fetchall()
        return {row[1]: Flag(*row) for row in rows}

    def counts(self, run_id: str) -> tuple[int, int]:
        """(flagged, reviewed): examples flagged as a problem, and all examples given a verdict."""
        flags = self.flags(run_id)
        return sum(flag.kind != "fine" for flag in flags.values()), len(flags)

    def export_csv(self, run_id: str, class_names: tuple[str, ...] | None = None) -> str:
        """The run's flags as CSV text, cells escaped against formula injection."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["run_id", "example_id", "kind", "suggested_label", "suggested_class", "note", "updated_at"])
        for flag in self.flags(run_id).values():
            suggested_class = class_names[flag.suggested_label] if class_names and flag.suggested_label is not None else ""
            writer.writerow(
                [escape_cell(str(value)) for value in (flag.run_id, flag.example_id, flag.kind,
                 "" if flag.suggested_label is None else flag.suggested_label, suggested_class, flag.note, flag.updated_at)]
            )
        return buffer.getvalue()

    def integrity_ok(self) -> bool:
        """SQLite's own integrity check of the database file."""
        with self._connect() as connection:
            return connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def escape_cell(value: str) -> str:
    """Prefix a quote to cells a spreadsheet would run as a formula (shared by every CSV export)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
