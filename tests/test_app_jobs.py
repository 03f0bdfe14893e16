"""Pages hand long work to jobs: the states a user sees (waiting, running, failed, cancelled, done), headless with AppTest.

TDX_JOBS=manual: pages queue jobs and nobody runs them until the test calls a worker, so each
state can be looked at in turn.
"""
from __future__ import annotations

import shutil

import pytest
from helpers_app import button_keys, open_app, texts
from streamlit.testing.v1 import AppTest

from attribution_core.jobs.queue import CANCELLED, DONE, FAILED, INTERACTIVE, QUEUED, REQUESTED, JobQueue, JobSpec
from attribution_core.jobs.worker import work
from attribution_core.runs.run import load_run
from attribution_core.store import Workspace


@pytest.fixture
def workspace(demo_workspace, tmp_path, monkeypatch) -> Workspace:
    """A private copy of the tiny demo; the app reads it, and nobody runs its jobs until a test does."""
    shutil.copytree(demo_workspace.root, tmp_path / "workspace")
    monkeypatch.setenv("TDX_WORKSPACE", str(tmp_path / "workspace"))
    monkeypatch.setenv("TDX_JOBS", "manual")
    return Workspace(tmp_path / "workspace")


def panel_buttons(app: AppTest, prefix: str) -> list[str]:
    return [button.key for button in app.button if button.key and button.key.startswith(prefix)]


def test_explore_shows_the_job_of_a_missing_block_and_stays_usable(workspace):
    app = open_app(run="fmnist-mlp-early", method="graddot", query="3")
    queue = JobQueue(workspace.root)
    (job,) = queue.jobs()
    assert job.state == QUEUED and job.spec.kind == "scores" and job.spec.params["queries"] == list(range(32))
    assert "gradient dot: scoring test samples 0–31 against the training set" in texts(app)
    assert "Waiting for a worker" in texts(app) and panel_buttons(app, "cancel_") == [f"cancel_{job.key}"]
    assert not panel_buttons(app, "results_proponents_")
    app.selectbox(key="query").set_value(40).run()  # another block: the page answers with that block's job
    assert not app.exception and len(queue.jobs()) == 2


def test_a_second_tab_and_a_reload_find_the_same_job_and_the_result_when_it_is_done(workspace):
    open_app(run="fmnist-mlp-early", method="graddot", query="3")
    second_tab = open_app(run="fmnist-mlp-early", method="graddot", query="7")
    queue = JobQueue(workspace.root)
    assert len(queue.jobs()) == 1, "the same block asked from two sessions is one job"
    assert work(workspace.root, "interactive", until_empty=True) == 1
    second_tab.run()  # what a reload or the panel's refresh does
    assert queue.jobs()[0].state == DONE and len(panel_buttons(second_tab, "results_proponents_")) == 10
    assert not panel_buttons(second_tab, "cancel_")


def test_cancel_then_start_again(workspace):
    app = open_app(run="fmnist-mlp-early", method="graddot", query="3")
    queue = JobQueue(workspace.root)
    (job,) = queue.jobs()
    app.button(key=f"cancel_{job.key}").click().run()
    assert queue.get(job.key).state == CANCELLED
    assert "was cancelled" in texts(app) and panel_buttons(app, "again_") == [f"again_{job.key}"]
    app.button(key=f"again_{job.key}").click().run()
    assert queue.get(job.key).state == QUEUED and "Waiting for a worker" in texts(app)


def test_a_failed_job_says_why_and_offers_to_try_again(workspace):
    (workspace.root / "runs" / "fmnist-mlp-early" / "checkpoints" / "ckpt_0002.safetensors").unlink()
    open_app(run="fmnist-mlp-early", method="tracin", query="3")  # TracIn uses every checkpoint
    work(workspace.root, "interactive", until_empty=True)
    app = open_app(run="fmnist-mlp-early", method="tracin", query="3")
    (job,) = JobQueue(workspace.root).jobs()
    assert job.state == FAILED and "missing checkpoint" in job.error
    assert any("failed: missing checkpoint" in error.value for error in app.error)
    assert panel_buttons(app, "again_") == [f"again_{job.key}"]


def test_a_job_that_would_fail_again_offers_no_try_again(workspace):
    open_app(run="fmnist-mlp-early", method="graddot", query="3")
    queue = JobQueue(workspace.root)
    (job,) = queue.jobs()
    queue.finish(job.key, FAILED, "run 'x' was recorded from a plain loop, which tdx cannot call again", retryable=False)
    app = open_app(run="fmnist-mlp-early", method="graddot", query="3")
    assert any("failed: run 'x' was recorded from a plain loop" in error.value for error in app.error)
    assert panel_buttons(app, "again_") == []


def test_compare_queues_the_ground_truth_only_when_asked_and_shows_its_progress(workspace):
    app = open_app("compare", run="fmnist-mlp-early")
    queue = JobQueue(workspace.root)
    assert not [job for job in queue.jobs() if job.spec.kind == "groundtruth"], "a ground truth is never started unasked"
    app.button(key="lds_compute").click().run()
    (truth,) = [job for job in queue.jobs() if job.spec.kind == "groundtruth"]
    assert truth.spec.title == "LDS ground truth: retraining on 50 random subsets"
    assert "Fewer subsets are faster" in texts(app)


def test_the_sidebar_names_waiting_jobs_and_draws_nothing_once_none_is_active(workspace):
    app = open_app(run="fmnist-mlp-early", method="graddot", query="3")  # queues the query's block
    app.run()
    sidebar = [caption.value for caption in app.sidebar.caption]
    assert any(text.startswith("**Background jobs**") and text.endswith("1 waiting") for text in sidebar), sidebar
    assert work(workspace.root, "interactive", until_empty=True) == 1
    app.run()
    assert not [caption.value for caption in app.sidebar.caption if "Background jobs" in caption.value]


def test_jobs_queued_under_a_former_or_an_unknown_kind_break_no_page(workspace):
    run = load_run(workspace, "fmnist-mlp-early")
    queue = JobQueue(workspace.root)
    former = queue.submit(JobSpec("features", run.run_id, run.created, {"checkpoint": 1}, "Find similar: features of checkpoint 1"))
    unknown = queue.submit(JobSpec("vibes", run.run_id, run.created, {}, "a kind from a newer tdx"))
    app = open_app(run="fmnist-mlp-early", method="graddot", query="3")  # open_app checks the page raised nothing
    sidebar = [caption.value for caption in app.sidebar.caption]  # drawn before the page queued its own block's job
    assert any("Background jobs" in text and text.endswith("2 waiting") for text in sidebar), sidebar
    assert work(workspace.root, "background", until_empty=True) == 3
    assert (queue.get(former.key).state, queue.get(unknown.key).state) == (DONE, FAILED)
    app.run()
    assert not app.exception and len(panel_buttons(app, "results_proponents_")) == 10


def test_the_status_line_counts_down_the_workers_estimate_and_says_why_it_changed(tmp_path):
    from app.components.jobs import status_line

    queue = JobQueue(tmp_path)
    job = queue.submit(JobSpec("fit", "run", "created", {}, "a fit"))
    queue.claim(0, 1)
    queue.report(job.key, 1, 10)
    started = queue.get(job.key).started
    assert status_line(queue.get(job.key), queue, now=started + 5) == "1 of 10 · 5 s so far · estimating the time left"
    queue.report(job.key, 4, 10, finish=started + 60, note="next phase: estimated again")
    running = queue.get(job.key)
    assert status_line(running, queue, now=started + 20) == "4 of 10 · 20 s so far · about 40 s left · next phase: estimated again"
    assert status_line(running, queue, now=started + 30).endswith("about 30 s left · next phase: estimated again")
    assert "finishing" in status_line(running, queue, now=started + 61)


@pytest.fixture
def every_run_large(monkeypatch):
    """Every run counts as large (jobs.ready.large_run), so the tiny demo's runs open as a 60,000-image run does."""
    monkeypatch.setattr("attribution_core.jobs.ready.LARGE_RUN_WORK", 0)


def test_a_large_run_shows_a_quick_method_at_once_and_the_default_one_when_its_fit_is_done(workspace, every_run_large):
    app = open_app(run="fmnist-mlp-early", query="3")
    queue = JobQueue(workspace.root)
    jobs = {(job.spec.kind, job.spec.params["method"]): job for job in queue.jobs()}
    assert set(jobs) == {("fit", "trak"), ("scores", "repsim")}  # TRAK's block waits for its fit: no block fits in a click's lane
    assert jobs["fit", "trak"].spec.priority == REQUESTED and jobs["scores", "repsim"].spec.priority == INTERACTIVE
    assert work(workspace.root, "interactive", until_empty=True) == 1  # the click's lane takes the quick block only
    app.run()
    assert "Shown meanwhile: **representation similarity**" in texts(app)
    assert button_keys(app, "results_proponents_") and "TRAK: fit on the training set" in texts(app)  # its panel stays
    work(workspace.root, "background", until_empty=True)  # the fit
    app.run()  # the fit's panel reran the page: TRAK's block is now a click's job
    (block,) = [job for job in queue.jobs(states=(QUEUED,))]
    assert (block.spec.kind, block.spec.params["method"], block.spec.priority) == ("scores", "trak", INTERACTIVE)
    work(workspace.root, "interactive", until_empty=True)
    app.run()
    assert "Shown meanwhile" not in texts(app) and button_keys(app, "results_proponents_")
    assert "TRAK" in app.selectbox(key="method").format_func(app.selectbox(key="method").value)


def test_compare_opens_a_large_run_with_the_default_and_the_quick_method_and_no_exact_tracin(workspace, every_run_large):
    app = open_app("compare", run="fmnist-mlp-early", query="3")
    assert app.multiselect(key="compare_methods").value == ["trak", "repsim"]
    assert "A large run" in texts(app)
    methods = {job.spec.params.get("method") for job in JobQueue(workspace.root).jobs()}
    assert methods == {"trak", "repsim"}
    work(workspace.root, "interactive", until_empty=True)
    app.run()
    assert not app.exception and "representation similarity** · top 10 proponents" in texts(app)
