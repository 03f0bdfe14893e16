"""B6: fault injection at scale: real `tdx` jobs SIGKILLed at random moments, the workspace checked after each.

The trials are tests/helpers_faults.py's, which says what a trial checks (tests/test_faults.py kills
each kind of job once with them). 100 trials, spread evenly over the jobs; --quick: 10; --smoke: one
trial of the cheapest job, the flag writer (a few seconds of CPU, most of its time waiting on the disk).

    python benchmarks/b6_faults.py [--quick | --smoke] [--json PATH]
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import by_mode, markdown_table, parser, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers_faults import JOBS, run_trials, summary  # noqa: E402  (the fault injection the tests use, from their folder)

JSON_KEYS = ("trials", "corrupt", "lost_flags", "resumed_identical", "by_job")
SMOKE_JOBS = [job for job in JOBS if job.name == "flags"]

SETUP = ("Each trial kills the job with SIGKILL after a random delay within its uninterrupted duration, checks the workspace, "
         "reruns the job and compares every result's bytes with an uninterrupted run's. The jobs run on one CPU thread: with "
         "two, uninterrupted runs already differ in their last bits on a busy machine (see REPRODUCIBLE in tests/helpers_faults.py).")
"""What the report says before the table."""


def main() -> None:
    arguments = parser(__doc__.splitlines()[0]).parse_args()
    trials = run_trials(by_mode(arguments, full=100, quick=10, smoke=1), jobs=by_mode(arguments, full=JOBS, quick=JOBS, smoke=SMOKE_JOBS))
    payload = summary(trials)
    rows = [[job, v["trials"], v["corrupt"], v["lost_flags"], v["resumed_identical"]] for job, v in payload["by_job"].items()]
    rows.append(["all", payload["trials"], payload["corrupt"], payload["lost_flags"], payload["resumed_identical"]])
    body = (f"{SETUP}\n\n" + markdown_table(["job", "trials", "corrupt", "lost flags", "resumed identical"], rows))
    report("b6", "B6 · Fault injection (SIGKILL at a random moment)", body, arguments, payload)


if __name__ == "__main__":
    main()
