"""Shared fixtures."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attribution_core.evaluation.lds import LdsSettings, groundtruth
from attribution_core.runs.demo import build_demo
from attribution_core.runs.run import load_run
from attribution_core.runs.threads import one_thread
from attribution_core.store import Workspace
from attribution_core.trust import CONFIG_ENV


@pytest.fixture(scope="session", autouse=True)
def private_config_dir(tmp_path_factory) -> Iterator[Path]:
    """tdx's per-user settings (consent to import a run's code: trust.py) in a folder of the test session's, not ~/.config."""
    folder = tmp_path_factory.mktemp("tdx_config")
    previous = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(folder)  # subprocesses (the app, job workers) inherit it
    yield folder
    if previous is None:
        os.environ.pop(CONFIG_ENV, None)
    else:
        os.environ[CONFIG_ENV] = previous


@pytest.fixture(scope="module")
def single_threaded() -> Iterator[None]:
    """Torch on one thread for a module: its small models gain nothing from threads, which slow them badly on a busy machine."""
    with one_thread():
        yield


@pytest.fixture
def app_serves_workspace(workspace, monkeypatch) -> None:
    """The app reads its workspace (the module's `workspace` fixture) from TDX_WORKSPACE; its jobs run inline, in the page."""
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> Workspace:
    """The tiny demo workspace (fmnist-mlp, fmnist-mlp-early, fmnist-two-stage, fmnist-noisy), built once per session.

    Shared by every test that asks for it: copy its root (shutil.copytree) before writing to it.
    """
    workspace = Workspace(tmp_path_factory.mktemp("demo_workspace"))
    build_demo(workspace, tiny=True)
    return workspace


@pytest.fixture(scope="session")
def demo_copy(demo_workspace, tmp_path_factory) -> Callable[[str, LdsSettings], Workspace]:
    """demo_copy(name, ground_truth): a private copy of the tiny demo with LDS ground truth for fmnist-mlp."""

    def copy(name: str, ground_truth: LdsSettings) -> Workspace:
        root = tmp_path_factory.mktemp(name) / "workspace"
        shutil.copytree(demo_workspace.root, root)
        workspace = Workspace(root)
        groundtruth(load_run(workspace, "fmnist-mlp"), ground_truth)
        return workspace

    return copy
