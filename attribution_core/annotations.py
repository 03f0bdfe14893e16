"""Flags on training examples, kept in the workspace's annotations.sqlite.

One row per (run, example): its kind (mislabeled, ambiguous, outlier, fine), an optional
suggested label and a note. SQLite in WAL mode with a busy timeout, so the app's sessions and
a CLI can write at once; every write commits before it returns, so a flag the user saw saved
survives a crash or a restart. Queries are parameterised; exported CSV cells are escaped
against spreadsheet formula injection.
"""
from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
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
)
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
                connection.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise WorkspaceError(f"cannot open annotations database {self.path}: {exc}") from exc

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as connection:
            connection.execute("PRAGMA busy_timeout=30000")
            connection.execute("PRAGMA synchronous=FULL")
            with connection:
                yield connection

    def set_flag(self, run_id: str, example_id: int, kind: str, *, suggested_label: int | None = None, note: str = "") -> Flag:
        """Save (or replace) the flag of one example; committed when this returns."""
        if kind not in FLAG_KINDS:
            raise SettingsError(f"flag kind {kind!r}: choose one of {', '.join(FLAG_KINDS)}")
        flag = Flag(run_id, int(example_id), kind, None if suggested_label is None else int(suggested_label), str(note),
                    datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
        with self._connect() as connection:
            connection.execute(
                "INSERT INTO flags (run_id, example_id, kind, suggested_label, note, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, example_id) DO UPDATE SET kind = excluded.kind, "
                "suggested_label = excluded.suggested_label, note = excluded.note, updated_at = excluded.updated_at",
                (flag.run_id, flag.example_id, flag.kind, flag.suggested_label, flag.note, flag.updated_at),
            )
        return flag

    def remove_flag(self, run_id: str, example_id: int) -> None:
        """Forget the verdict on one example."""
        with self._connect() as connection:
            connection.execute("DELETE FROM flags WHERE run_id = ? AND example_id = ?", (run_id, int(example_id)))

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
