"""The real app in a real browser: `tdx app` on a free port, driven by Playwright with Debian's Chromium.

Screenshots go to test-artifacts/screenshots/ (git-ignored); a failing test saves one there too.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from attribution_core.evaluation.lds import LdsSettings
from attribution_core.store import Workspace

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
GROUND_TRUTH = LdsSettings(n_subsets=10)
SERVER_START_SECONDS = 60


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll Streamlit's health endpoint until it answers, or fail with the server's log."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with code {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:  # noqa: S310 (a local http URL)
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the app did not answer on {url} within {SERVER_START_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def browser_workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace, with a small LDS ground truth for fmnist-mlp (the Compare page's scatter)."""
    return demo_copy("browser", GROUND_TRUTH)


@dataclass(frozen=True)
class App:
    """A running `tdx app`: its base URL, the workspace it shows, and the file its output goes to."""

    url: str
    workspace: Workspace
    log: Path


@contextlib.contextmanager
def serve(workspace: Workspace, log: Path) -> Iterator[App]:
    """`tdx app --headless --no-demo` on a free port of 127.0.0.1 over `workspace`, stopped on exit."""
    port = free_port()
    tdx = Path(sys.executable).parent / "tdx"
    command = [str(tdx), "app", "--headless", "--no-demo", "--port", str(port), "--workspace", str(workspace.root)]
    with open(log, "w") as output:
        # A session of its own: `tdx app` starts streamlit as a child, and both must stop at the end.
        server = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, log)
        yield App(url, workspace, log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def app_url(browser_workspace, tmp_path_factory):
    """`tdx app --headless --no-demo` on a free port of 127.0.0.1; yields its base URL."""
    with serve(browser_workspace, tmp_path_factory.mktemp("server") / "app.log") as app:
        yield app.url


@pytest.fixture(scope="module")
def private_app(demo_workspace, tmp_path_factory) -> Iterator[App]:
    """The app on a copy of the demo workspace (no ground truth) that only this test module uses and writes to."""
    root = tmp_path_factory.mktemp("private_app")
    shutil.copytree(demo_workspace.root, root / "workspace")
    with serve(Workspace(root / "workspace"), root / "app.log") as app:
        yield app


@pytest.fixture(scope="session")
def chromium_options() -> dict:
    """Keyword arguments of chromium.launch for Debian's Chromium (sync or async API alike)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser(chromium_options):
    """Debian's Chromium, launched the way this machine allows (no playwright install)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(**chromium_options)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The folder the browser tests save screenshots to (printed once)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    return SCREENSHOTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's outcome on the test item, so the page fixture can tell a failure."""
    outcome = yield
    setattr(item, f"report_{call.when}", outcome.get_result())


@pytest.fixture
def page(browser, screenshots, request):
    """A fresh browser tab; on failure, a screenshot named after the test."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    tab = context.new_page()
    yield tab
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        tab.screenshot(path=str(screenshots / f"FAILED-{request.node.name}.png"), full_page=True)
    context.close()
