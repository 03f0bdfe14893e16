"""Shared fixtures."""
from __future__ import annotations

import pytest

from attribution_core.demo import build_demo
from attribution_core.store import Workspace


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> Workspace:
    """The tiny demo workspace (fmnist-mlp, fmnist-mlp-early, fmnist-two-stage, fmnist-noisy), built once per session.

    Shared by every test that asks for it: copy its root (shutil.copytree) before writing to it.
    """
    workspace = Workspace(tmp_path_factory.mktemp("demo_workspace"))
    build_demo(workspace, tiny=True)
    return workspace
