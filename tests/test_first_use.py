"""The rough edges a first-time user met (issue 29, item 5), each as the page now answers it; AppTest on the tiny demo."""
from __future__ import annotations

import pytest
from test_app_pages import GROUND_TRUTH, button_keys, open_app

from attribution_core.store import Workspace


@pytest.fixture(scope="module")
def workspace(demo_copy) -> Workspace:
    """A private copy of the demo workspace with LDS ground truth for fmnist-mlp."""
    return demo_copy("first_use", GROUND_TRUTH)


@pytest.fixture(autouse=True)
def workspace_env(workspace, monkeypatch):
    """The app reads its workspace from TDX_WORKSPACE; its jobs run inline, in the page."""
    monkeypatch.setenv("TDX_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("TDX_JOBS", "inline")


# --- Explore: a note ------------------------------------------------------------------------------------------------


def test_a_note_toast_only_for_a_note_with_words(workspace):
    app = open_app(run="fmnist-noisy", method="trak")
    index = int(button_keys(app, "results_opponents_")[0].removeprefix("results_opponents_"))
    app.button(key=f"results_opponents_{index}").click().run()
    note = f"inspect_{index}_note"
    app.text_input(key=note).set_value("   ").run()
    assert not app.toast, "blanks are no note"
    app.text_input(key=note).set_value("a bag?").run()
    assert [toast.value for toast in app.toast] == [f"Note on #{index} kept: it is saved with the verdict you choose."]
    app.text_input(key=note).set_value("").run()
    assert not app.toast, "an emptied note keeps nothing"
