"""Long work never blocks a page (issue 19): in Chromium, on a fresh demo workspace whose first jobs were queued at build.

- the Map and Compare's LDS scatter appear without a button press, from the jobs `tdx demo` queued;
- Explore answers a new query while a long job runs in the background;
- a reload while a job waits neither loses nor duplicates it, and its result appears when it is done.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest
from conftest import serve
from page_scripts import SCRIPT_FINISHED

from attribution_core.evaluation.lds import LdsSettings
from attribution_core.jobs.kinds import groundtruth_job
from attribution_core.jobs.queue import DONE, REQUESTED, RUNNING, JobQueue
from attribution_core.jobs.ready import queue_ready_jobs
from attribution_core.jobs.worker import work
from attribution_core.runs.run import list_runs, load_run
from attribution_core.store import Workspace

pytestmark = pytest.mark.browser

TIMEOUT_MS = 180_000


@pytest.fixture
def fresh_workspace(demo_workspace, tmp_path) -> Workspace:
    """A copy of the tiny demo with nothing computed, and the jobs `tdx demo` queues for the first pages."""
    shutil.copytree(demo_workspace.root, tmp_path / "workspace", ignore=shutil.ignore_patterns("states", "scores", "groundtruth",
                                                                                               "layouts", "mislabels", "self_influence",
                                                                                               "counterfactual", "jobs*"))
    workspace = Workspace(tmp_path / "workspace")
    queue_ready_jobs(workspace, list_runs(workspace), with_groundtruth=True)
    return workspace


def wait_finished(page) -> None:
    page.wait_for_function(SCRIPT_FINISHED, timeout=TIMEOUT_MS)


def test_map_and_lds_scatter_appear_without_a_button_press(page, fresh_workspace, tmp_path, screenshots):
    with serve(fresh_workspace, tmp_path / "app.log") as app:
        started = time.monotonic()
        page.goto(f"{app.url}/map?run=fmnist-mlp")
        page.locator(".st-key-map_chart .scatterlayer .point").first.wait_for(timeout=TIMEOUT_MS)
        map_seconds = time.monotonic() - started
        page.goto(f"{app.url}/compare?run=fmnist-mlp")
        page.locator(".st-key-lds_scatter .scatterlayer .point").first.wait_for(timeout=TIMEOUT_MS)
        lds_seconds = time.monotonic() - started
        wait_finished(page)
        page.screenshot(path=str(screenshots / "compare-lds-from-ready-jobs.png"), full_page=True)
    print(f"\nfrom the first page load: map shown after {map_seconds:.1f} s, LDS scatter after {lds_seconds:.1f} s")
    truth = [job for job in JobQueue(fresh_workspace.root).jobs(run_id="fmnist-mlp") if job.spec.kind == "groundtruth"]
    assert len(truth) == 1 and truth[0].state == DONE, "the scatter comes from the ground truth queued at build, computed once"


def test_explore_answers_a_new_query_while_a_long_job_runs(page, fresh_workspace, tmp_path):
    run = load_run(fresh_workspace, "fmnist-two-stage")
    queue = JobQueue(fresh_workspace.root)
    long_job = queue.submit(groundtruth_job(run, LdsSettings(n_subsets=400), priority=REQUESTED))
    with serve(fresh_workspace, tmp_path / "app.log") as app:
        page.goto(f"{app.url}/?run=fmnist-mlp&query=3")
        page.get_by_text("Proponents: training examples").wait_for(timeout=TIMEOUT_MS)
        deadline = time.monotonic() + 120
        while queue.get(long_job.key).state != RUNNING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue.get(long_job.key).state == RUNNING
        started = time.monotonic()
        page.goto(f"{app.url}/?run=fmnist-mlp&query=70")  # another block of test samples: scored by the interactive lane
        page.get_by_text("Proponents: training examples").wait_for(timeout=TIMEOUT_MS)
        seconds = time.monotonic() - started
        assert queue.get(long_job.key).state == RUNNING, "the long job went on meanwhile"
    print(f"\na new block's proponents shown {seconds:.1f} s after the click, beside a 400-subset ground truth")


def test_a_reload_while_a_job_waits_keeps_one_job_and_shows_its_result(page, fresh_workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("TDX_JOBS", "manual")  # nobody runs the job until the test does
    queue = JobQueue(fresh_workspace.root)
    before = len(queue.jobs())
    with serve(fresh_workspace, tmp_path / "app.log") as app:
        page.goto(f"{app.url}/?run=fmnist-two-stage&method=graddot&query=40")
        page.get_by_text("gradient dot: scoring test samples 32–63").wait_for(timeout=TIMEOUT_MS)
        page.reload()
        page.get_by_text("gradient dot: scoring test samples 32–63").wait_for(timeout=TIMEOUT_MS)
        waiting = [job for job in queue.jobs() if job.spec.title.startswith("gradient dot")]
        assert len(waiting) == 1 and len(queue.jobs()) == before + 1, "the reload found the job, it did not add one"
        worker = threading.Thread(target=work, args=(fresh_workspace.root, "interactive"), kwargs={"until_empty": True})
        worker.start()
        worker.join()
        page.get_by_text("Proponents: training examples").wait_for(timeout=TIMEOUT_MS)  # the panel's refresh picks it up
    assert queue.get(waiting[0].key).state == DONE
