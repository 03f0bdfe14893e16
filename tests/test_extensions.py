"""The extension checklists hold: a new method, job kind, mislabel ranking, data source, command or page is one declaration.

Each test declares a new entry the way its package's docstring says (registered here with monkeypatch) and checks that
every consumer takes it with no other edit: the registries, the CLI's help and commands, the workers, the app's pages.
"""
from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_app import button_keys, open_app, texts
from streamlit.testing.v1 import AppTest

from attribution_core import cli
from attribution_core.api import attribute, stored_scores
from attribution_core.data import DATA_SOURCES, DataSource, DataSpec, dataset_from_arrays, load_dataset
from attribution_core.evaluation import mislabel
from attribution_core.evaluation.mislabel import (
    RANKINGS,
    Ranking,
    rank_mislabels,
    ranking_label,
    rankings_for,
    stored_ranking,
)
from attribution_core.jobs import kinds
from attribution_core.jobs.kinds import JobKind, load_result, ranking_job
from attribution_core.jobs.queue import DONE, JobQueue, JobSpec
from attribution_core.jobs.ready import offered_methods
from attribution_core.jobs.worker import work
from attribution_core.methods import METHODS, method_class
from attribution_core.methods.base import Method
from attribution_core.runs.run import Run, load_run
from attribution_core.store import Workspace, atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(demo_workspace, tmp_path_factory) -> Workspace:
    """A private copy of the tiny demo (these tests store what the new entries compute)."""
    root = tmp_path_factory.mktemp("extensions") / "workspace"
    shutil.copytree(demo_workspace.root, root)
    return Workspace(root)


@pytest.fixture
def run(workspace) -> Run:
    return load_run(workspace, "fmnist-mlp")


@pytest.fixture
def app_env(workspace, monkeypatch):
    """The app on the copy, its jobs run in the page."""
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


def help_of(command: str, monkeypatch) -> str:
    """`tdx <command> --help`, unwrapped (a terminal wide enough for every line)."""
    monkeypatch.setenv("COLUMNS", "10000")
    parser = cli.build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command].format_help()


# --- a method: one Method subclass and one line in METHODS ------------------------------------------------------------


@dataclass
class PixelSettings:
    """Every knob of pixel dot."""

    scale: float = field(default=1.0, metadata={"help": "multiplies every score"})


class PixelDot(Method):
    """The dot product of raw inputs: a stand-in method any run can use, with scores checkable by hand."""

    name = "pixeldot"
    label = "pixel dot"
    Settings = PixelSettings
    estimates_removal = False

    def fit(self, inputs):
        return {"train": inputs.train_x.flatten(1) * self.settings.scale}

    def score(self, state, inputs, query_x, query_y):
        return query_x.flatten(1).to(state["train"]) @ state["train"].T


def test_a_method_declared_in_methods_reaches_the_front_door_the_cli_and_the_app(run, app_env, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, PixelDot.name, PixelDot)
    train_set, test_set = run.datasets()
    expected = (test_set.x[[0, 1]].flatten(1) @ train_set.x.flatten(1).T).numpy()
    scores = attribute(run, "pixeldot", queries=[0, 1], device="cpu")
    np.testing.assert_allclose(scores.values, expected, rtol=1e-5)
    assert stored_scores(run, "pixeldot", queries=[0, 1]).key == scores.key and method_class("pixeldot") is PixelDot
    assert "pixeldot: pixel dot" in help_of("attribute", monkeypatch)
    cli.main(["attribute", run.run_id, "--workspace", str(run.workspace.root), "--method", "pixeldot", "--queries", "0-1"])
    assert capsys.readouterr().out.startswith(f"pixeldot: 2 queries x {len(train_set)} training examples")
    assert "pixeldot" in offered_methods(run)
    app = open_app(run=run.run_id, method="pixeldot", query="0")
    assert "pixel dot" in app.selectbox(key="method").options and app.selectbox(key="method").value == "pixeldot"
    assert len(button_keys(app, "results_proponents_")) == 10 and "pixel dot" in texts(app)


# --- a job kind: run and load functions and one JobKind in KINDS -----------------------------------------------------


def _echo(run: Run, params, progress) -> None:
    run.artifact("echoes", text=params["text"]).compute_once(
        lambda stored: atomic_write_bytes(stored.path("echo.txt"), params["text"].encode()))
    progress(1, 1)


def _echoed(run: Run, params) -> str | None:
    artifact = run.artifact("echoes", text=params["text"])
    return artifact.path("echo.txt").read_text() if artifact.is_complete() else None


ECHO = JobKind("echo", _echo, _echoed, "An echo is stored once, then read.")


def _echo_page(run_id: str, text: str) -> None:
    """A page that asks for an echo job's result (AppTest runs this function's body as a script)."""
    from app.components.core_calls import load_run_cached
    from app.components.jobs import job_result
    from attribution_core.jobs.queue import JobSpec

    run = load_run_cached(run_id)
    job_result(run, JobSpec("echo", run.run_id, run.created, {"text": text}, f"Echo {text}"))


def test_a_job_kind_declared_in_kinds_runs_in_a_worker_is_listed_and_shows_its_hint_on_a_page(run, workspace, monkeypatch, capsys):
    monkeypatch.setitem(kinds.KINDS, "echo", ECHO)
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "manual")
    page = AppTest.from_function(_echo_page, args=(run.run_id, "hello"), default_timeout=60)
    page.run()
    assert not page.exception, [exception.message for exception in page.exception]
    assert "Echo hello" in texts(page) and "An echo is stored once, then read. The page stays usable meanwhile." in texts(page)
    spec = JobSpec("echo", run.run_id, run.created, {"text": "hello"}, "Echo hello")
    assert load_result(run, spec) is None
    assert work(workspace.root, "background", until_empty=True) == 1
    assert JobQueue(workspace.root).get(spec.key).state == DONE and load_result(run, spec) == "hello"
    cli.main(["jobs", "--workspace", str(workspace.root), "--all"])
    assert f"{spec.key}  done" in capsys.readouterr().out


# --- a mislabel ranking: one Ranking in RANKINGS --------------------------------------------------------------------


def _brightness(run: Run, checkpoints, task, folds, progress) -> tuple[np.ndarray, None]:
    """The mean pixel of every training example (a stand-in ranking, checkable by hand)."""
    train_set, _ = run.datasets()
    progress(1, 1)
    return train_set.x.flatten(1).mean(1).double().numpy(), None


BRIGHTNESS = Ranking("brightness", "Mean brightness", "the mean pixel value of each training image (a stand-in)", _brightness)


def test_a_ranking_declared_in_rankings_is_computed_stored_offered_and_listed(run, app_env, monkeypatch, capsys):
    monkeypatch.setitem(RANKINGS, BRIGHTNESS.name, BRIGHTNESS)
    train_set, _ = run.datasets()
    brightness = train_set.x.flatten(1).mean(1).double().numpy()
    ranking = rank_mislabels(run, "brightness")
    np.testing.assert_allclose(ranking.scores, brightness)
    assert ranking.checkpoints == [] and ranking.suggested_labels is None
    monkeypatch.setattr(mislabel, "_compute", lambda *args: pytest.fail("a stored ranking was recomputed"))
    np.testing.assert_array_equal(stored_ranking(run, "brightness").scores, ranking.scores)
    assert rankings_for(run)["brightness"] == BRIGHTNESS.description and ranking_label("brightness") == "Mean brightness"
    assert ranking_job(run, "brightness").title == "Mislabels: ranking the training set by Mean brightness"
    assert "brightness" in help_of("mislabels", monkeypatch)
    cli.main(["mislabels", run.run_id, "--workspace", str(run.workspace.root), "--ranking", "brightness", "--top", "3"])
    brightest = np.argsort(-brightness, kind="stable")[:3]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert [int(re.match(r"#(\d+)", line).group(1)) for line in printed] == brightest.tolist()  # the page's index, as the app shows it
    app = open_app("mislabels", run=run.run_id, ranking="brightness")
    ranking_box = app.selectbox(key="ranking")
    assert ranking_box.value == "brightness" and "Mean brightness" in ranking_box.format_func("brightness")
    assert f"Suspect 1 of {len(train_set)}" in texts(app)


# --- a data source, a command, a page --------------------------------------------------------------------------------


def _checkerboards(spec: DataSpec):
    """Twelve 4x4 images of two classes: a stand-in data source."""
    images = np.stack([np.indices((4, 4)).sum(0) % 2 * 255 * (index % 2) for index in range(12)]).astype(np.uint8)
    labels = np.arange(12) % 2
    return dataset_from_arrays(images[:8], labels[:8], ("dark", "board")), dataset_from_arrays(images[8:], labels[8:], ("dark", "board"))


def test_a_data_source_declared_in_the_table_loads_and_is_listed(monkeypatch):
    monkeypatch.setitem(DATA_SOURCES, "boards", DataSource("boards", "twelve 4x4 checkerboards", _checkerboards))
    train, test = load_dataset(DataSpec(source="boards"))
    assert (len(train), len(test)) == (8, 4) and torch.equal(train.y, torch.tensor([0, 1] * 4))
    assert "boards: twelve 4x4 checkerboards" in help_of("train", monkeypatch)
    assert "boards: twelve 4x4 checkerboards" in help_of("import", monkeypatch)


def test_a_command_added_to_the_list_is_offered_and_runs_its_handler(monkeypatch, capsys):
    def add_hello_command(commands: cli.Commands) -> argparse.ArgumentParser:
        hello = cli.add_command(commands, "hello", "say hello")
        hello.add_argument("--name", default="world", help="whom to greet")
        hello.set_defaults(handler=lambda args: print(f"hello {args.name}"))
        return hello

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, add_hello_command])
    monkeypatch.setenv("COLUMNS", "10000")
    assert "hello               say hello" in cli.build_parser().format_help()
    assert "whom to greet (default: world)" in help_of("hello", monkeypatch)
    cli.main(["hello", "--name", "tdx"])
    assert capsys.readouterr().out == "hello tdx\n"


def test_every_script_in_views_is_a_declared_page():
    from app.main import PAGES, VIEWS_DIR

    assert sorted(page.script for page in PAGES) == sorted(path.name for path in VIEWS_DIR.glob("*.py"))
    assert len({page.title for page in PAGES}) == len(PAGES) and PAGES[0].script == "explore.py"
