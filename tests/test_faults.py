"""Fault injection, small: each kind of job killed once at a random moment (benchmarks/b6_faults.py runs 100)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import b6_faults  # noqa: E402  (a benchmark script, imported from its folder)


@pytest.mark.slow
def test_killed_jobs_leave_no_corruption_lose_no_flag_and_resume_identically():
    trials = b6_faults.run_trials(len(b6_faults.JOBS), seed=1)
    payload = b6_faults.summary(trials)
    assert sorted(payload["by_job"]) == sorted(job.name for job in b6_faults.JOBS)
    assert payload["corrupt"] == 0
    assert payload["lost_flags"] == 0
    assert payload["resumed_identical"] == payload["trials"], trials
