"""Flags in annotations.sqlite: saved at once, kept across restarts, safe to export."""
from __future__ import annotations

import csv
import io
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from attribution_core.annotations import Annotations
from attribution_core.errors import SettingsError


def test_flags_survive_a_new_connection(tmp_path):
    Annotations(tmp_path / "annotations.sqlite").set_flag("run-a", 7, "mislabeled", suggested_label=3, note="looks like a 3")
    reopened = Annotations(tmp_path / "annotations.sqlite")
    flag = reopened.flags("run-a")[7]
    assert (flag.kind, flag.suggested_label, flag.note) == ("mislabeled", 3, "looks like a 3")
    assert reopened.flags("run-b") == {}


def test_database_uses_write_ahead_logging(tmp_path):
    Annotations(tmp_path / "a.sqlite")
    with sqlite3.connect(tmp_path / "a.sqlite") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reflagging_replaces_and_counts_follow(tmp_path):
    annotations = Annotations(tmp_path / "a.sqlite")
    annotations.set_flag("r", 1, "mislabeled")
    annotations.set_flag("r", 2, "fine")
    annotations.set_flag("r", 1, "ambiguous")
    assert annotations.flags("r")[1].kind == "ambiguous"
    assert annotations.counts("r") == (1, 2)
    annotations.remove_flag("r", 1)
    assert annotations.counts("r") == (0, 1)


@pytest.mark.badinput
def test_unknown_flag_kind_is_rejected(tmp_path):
    with pytest.raises(SettingsError, match="mislabeled, ambiguous, outlier, fine"):
        Annotations(tmp_path / "a.sqlite").set_flag("r", 1, "wrong")


@pytest.mark.badinput
def test_sql_looking_notes_are_stored_verbatim(tmp_path, record_property):
    annotations = Annotations(tmp_path / "a.sqlite")
    note = "'); DROP TABLE flags; -- \"quoted\""
    annotations.set_flag("r'; --", 1, "outlier", note=note)
    annotations.set_flag("r", 2, "fine", note="x' OR '1'='1")
    assert annotations.flags("r'; --")[1].note == note
    assert list(annotations.flags("r")) == [2] and annotations.flags("r")[2].note == "x' OR '1'='1"
    assert annotations.integrity_ok()
    record_property("user_sees", f"no error: the note is saved and shown verbatim: {note}")


@pytest.mark.badinput
def test_csv_export_escapes_formula_cells(tmp_path, record_property):
    annotations = Annotations(tmp_path / "a.sqlite")
    annotations.set_flag("r", 4, "mislabeled", suggested_label=1, note="=HYPERLINK(\"http://x\")")
    annotations.set_flag("r", 5, "fine", note="@SUM(A1)")
    annotations.set_flag("r", 6, "outlier", note="+1+cmd|' /C calc'!A0")
    annotations.set_flag("r", 7, "ambiguous", note="-2+3")
    annotations.set_flag("r", 8, "ambiguous", note="plain; a = b")
    rows = list(csv.DictReader(io.StringIO(annotations.export_csv("r", class_names=("zero", "one")))))
    assert [row["example_id"] for row in rows] == ["4", "5", "6", "7", "8"]
    assert rows[0]["suggested_class"] == "one"
    assert [row["note"] for row in rows] == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "'+1+cmd|' /C calc'!A0", "'-2+3", "plain; a = b"]
    record_property("user_sees", "no error: exported note cells read " + ", ".join(row["note"] for row in rows[:4]))


@pytest.mark.badinput
def test_two_sessions_flagging_the_same_example_at_once_keep_one_whole_verdict(tmp_path, record_property):
    path = tmp_path / "a.sqlite"
    Annotations(path)
    verdicts = {"A": ("mislabeled", 3, "session A"), "B": ("ambiguous", None, "session B")}
    start = threading.Barrier(2)

    def session(name: str) -> list[str]:
        annotations, (kind, suggested, note) = Annotations(path), verdicts[name]
        start.wait()
        return [annotations.set_flag("r", 7, kind, suggested_label=suggested, note=note).kind for _ in range(50)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        saved = list(pool.map(session, ["A", "B"]))
    assert saved == [["mislabeled"] * 50, ["ambiguous"] * 50], "every write returned saved, none failed as locked"
    flags = Annotations(path).flags("r")
    assert list(flags) == [7]
    assert (flags[7].kind, flags[7].suggested_label, flags[7].note) in verdicts.values()
    assert Annotations(path).integrity_ok()
    record_property("user_sees", f"no error: both sessions' flags are saved; the later one stands ({flags[7].note})")


def test_concurrent_writers_lose_no_flag(tmp_path):
    path = tmp_path / "a.sqlite"
    Annotations(path)

    def write(example_id: int) -> None:
        Annotations(path).set_flag("r", example_id, "mislabeled")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(200)))
    assert sorted(Annotations(path).flags("r")) == list(range(200))


def test_undo_restores_what_the_last_action_replaced(tmp_path):
    store = Annotations(tmp_path / "a.sqlite")
    store.set_flag("run", 1, "ambiguous", note="blurry")
    store.set_flag("run", 1, "mislabeled", suggested_label=3)
    assert store.can_undo("run") == 1
    assert store.undo("run") == [1]
    restored = store.flags("run")[1]
    assert (restored.kind, restored.suggested_label, restored.note) == ("ambiguous", None, "blurry")
    assert store.undo("run") == [1] and store.flags("run") == {}, "undoing the first flag leaves no verdict"
    assert store.undo("run") == [] and store.can_undo("run") == 0


def test_a_bulk_flag_is_one_action_and_one_undo(tmp_path):
    store = Annotations(tmp_path / "a.sqlite")
    store.set_flag("run", 2, "fine")
    flags = store.set_flags("run", [1, 2, 3, 2], "outlier")
    assert [flag.example_id for flag in flags] == [1, 2, 3] and store.counts("run") == (3, 3)
    assert store.can_undo("run") == 3
    assert sorted(store.undo("run")) == [1, 2, 3]
    assert {example: flag.kind for example, flag in store.flags("run").items()} == {2: "fine"}


def test_undoable_actions_count_each_actors_actions_left_to_undo(tmp_path):
    store = Annotations(tmp_path / "a.sqlite")
    store.set_flags("run", [1, 2, 3], "outlier", actor="tab-a")
    store.set_flag("run", 4, "fine", actor="tab-a")
    store.set_flag("run", 5, "fine", actor="tab-b")
    assert store.undoable_actions("run", actor="tab-a") == 2 and store.undoable_actions("run") == 3
    store.undo("run", actor="tab-a")
    assert store.undoable_actions("run", actor="tab-a") == 1 and store.undoable_actions("other", actor="tab-a") == 0


def test_a_bulk_flag_keeps_each_examples_own_suggested_label(tmp_path):
    store = Annotations(tmp_path / "a.sqlite")
    store.set_flags("run", [1, 2, 3], "mislabeled", suggested_labels={1: 4, 3: 0, 9: 7})
    assert {example: flag.suggested_label for example, flag in store.flags("run").items()} == {1: 4, 2: None, 3: 0}
    store.undo("run")
    assert store.flags("run") == {}


def test_undo_is_per_run_and_per_actor_and_survives_a_reopen(tmp_path):
    path = tmp_path / "a.sqlite"
    store = Annotations(path)
    store.set_flag("run", 1, "outlier", actor="tab-a")
    store.set_flag("run", 2, "outlier", actor="tab-b")
    store.set_flag("other", 1, "fine", actor="tab-a")
    reopened = Annotations(path)
    assert reopened.undo("run", actor="tab-a") == [1]
    assert set(reopened.flags("run")) == {2} and set(reopened.flags("other")) == {1}


def test_removing_a_flag_can_be_undone(tmp_path):
    store = Annotations(tmp_path / "a.sqlite")
    store.set_flag("run", 5, "mislabeled", suggested_label=0, note="n")
    store.remove_flag("run", 5)
    assert store.undo("run") == [5] and store.flags("run")[5].suggested_label == 0
