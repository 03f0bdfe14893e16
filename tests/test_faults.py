"""Fault injection, small: each kind of job killed once at a random moment (benchmarks/b6_faults.py runs 100)."""
from __future__ import annotations

import pytest
from helpers_faults import JOBS, run_trials, summary


@pytest.mark.slow
def test_killed_jobs_leave_no_corruption_lose_no_flag_and_resume_identically():
    trials = run_trials(len(JOBS), seed=1)
    payload = summary(trials)
    assert sorted(payload["by_job"]) == sorted(job.name for job in JOBS)
    assert payload["corrupt"] == 0
    assert payload["lost_flags"] == 0
    assert payload["resumed_identical"] == payload["trials"], trials
