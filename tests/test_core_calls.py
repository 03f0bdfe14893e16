"""The app's process-wide results store: one computation per key, however many sessions ask at once."""
from __future__ import annotations

import threading
import time

from app.components import core_calls


def test_sessions_asking_for_the_same_missing_result_at_once_compute_it_once():
    calls, results = [], []

    def compute() -> str:
        calls.append(1)
        time.sleep(0.2)  # long enough for the other sessions to arrive while it runs
        return "scores"

    key = ("test", time.time_ns())
    sessions = [threading.Thread(target=lambda: results.append(core_calls.remembered(key, compute))) for _ in range(5)]
    for session in sessions:
        session.start()
    for session in sessions:
        session.join()
    assert calls == [1] and results == ["scores"] * 5


def test_the_least_recently_used_result_is_dropped_beyond_the_limit(monkeypatch):
    monkeypatch.setattr(core_calls, "_REMEMBERED_RESULTS", 2)
    prefix = ("lru", time.time_ns())
    for index in range(3):
        core_calls.remembered((*prefix, index), lambda index=index: index)
    assert core_calls.remembered((*prefix, 0), lambda: "recomputed") == "recomputed"
    assert core_calls.remembered((*prefix, 2), lambda: "recomputed") == 2
