"""A review session on Explore driven from the keyboard in Chromium: explain a misprediction, flag two proponents, find
examples similar to one, undo, show one on the map; screenshots at 1280 and 1920 px with no label or badge cut."""
from __future__ import annotations

from pathlib import Path

import pytest
from page_actions import TIMEOUT_MS, grid_indices, results_shown, screenshot, selected, settle
from page_scripts import IMAGES_LOADED, SCRIPT_FINISHED

from attribution_core.annotations import Annotations
from attribution_core.runs.run import load_run

pytestmark = pytest.mark.browser

RUN = "fmnist-noisy"
"""The demo run with labels flipped on purpose: its grids carry "flipped, was …" badges."""

CUT_TEXT = """() => [...document.querySelectorAll('[data-testid=stMain] *, [role=dialog] *')].filter(element => {
    const text = (element.innerText || element.value || '').trim();
    if (!text || element.clientWidth <= 2) return false;  // a 1-px label is one hidden for screen readers
    const style = getComputedStyle(element);
    const leaf = element.children.length === 0 || ['P', 'SPAN'].includes(element.tagName);
    const clips = style.textOverflow === 'ellipsis' || (leaf && style.overflowX !== 'visible');
    return clips && element.scrollWidth > element.clientWidth + 1;
}).map(element => element.innerText || element.value)"""
"""Texts on the page or in its dialog that are cut: an element that clips its overflow and whose text is wider than it."""

GRID_STYLED = """() => [...document.querySelectorAll('style')].some(style => style.textContent.includes('st-key-grid_'))"""
"""main.py's grid style rules are on the page (a markdown element drawn after the grids: a moment later on a first load)."""


def styled(page) -> None:
    """settle, then wait for the grid style rules (what the badges look like once the page is whole)."""
    settle(page)
    page.wait_for_function(GRID_STYLED, timeout=TIMEOUT_MS)


def press(page, key: str, *, then: str, button: str | None = None) -> None:
    """Press a key with nothing focused, then wait until the page shows the text `then` and its script run has finished.

    button: the key of the page's button the key presses, waited for until enabled first (a page button is disabled,
    its key unbound, while a dialog is open, and for a moment after it closes).
    """
    if button is not None:
        page.locator(f".st-key-{button} button:enabled").first.wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press(key)
    page.get_by_text(then).first.wait_for(timeout=TIMEOUT_MS)
    settle(page)


def dialog_shows(page, index: int) -> None:
    """Wait until the dialog shows training example `index` and has finished drawing."""
    page.get_by_role("dialog").get_by_text(f"Training example #{index} ").wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function(SCRIPT_FINISHED, timeout=TIMEOUT_MS)
    page.wait_for_function(IMAGES_LOADED, timeout=TIMEOUT_MS)






def overlap(first: dict, second: dict) -> bool:
    """Whether two of Playwright's bounding boxes (x, y, width, height) overlap."""
    return (first["x"] < second["x"] + second["width"] and second["x"] < first["x"] + first["width"]
            and first["y"] < second["y"] + second["height"] and second["y"] < first["y"] + first["height"])

def test_explore_review_session_from_the_keyboard(page, private_app, screenshots: Path):
    store = Annotations(private_app.workspace.annotations_path)
    ids = load_run(private_app.workspace, RUN).datasets()[0].ids
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(f"{private_app.url}/?run={RUN}")
    results_shown(page)
    styled(page)
    opened_on = selected(page, "query")
    assert "→" in opened_on, "Explore opens on a misprediction"

    page.locator(".st-key-query_next button:enabled").first.wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("n")  # the next misprediction
    page.wait_for_function("first => !document.querySelector('.st-key-query input').value.startsWith(first)",
                           arg=opened_on.split(" · ")[0] + " ", timeout=TIMEOUT_MS)
    results_shown(page)
    assert "→" in selected(page, "query")
    proponents = grid_indices(page, "results_proponents")
    assert len(proponents) == 10

    press(page, "o", then="1 of 20 in this grid", button="open_next_proponent")  # the strongest proponent not yet reviewed
    dialog_shows(page, proponents[0])
    assert "removing it would lower the margin of" in page.get_by_role("dialog").inner_text()
    press(page, "m", then="2 of 20 in this grid")  # mislabeled, and on to the next proponent
    toast = page.locator("[data-testid=stToast]").filter(has_text=f"#{proponents[0]} flagged mislabeled")
    toast.wait_for(timeout=TIMEOUT_MS)
    close = page.get_by_role("dialog").get_by_role("button", name="Close").bounding_box()
    assert not overlap(toast.bounding_box(), close), "the toast leaves the dialog's Close button free"
    dialog_shows(page, proponents[1])
    press(page, "o", then="3 of 20 in this grid")  # outlier
    dialog_shows(page, proponents[2])
    flags = store.flags(RUN)
    assert [flags[int(ids[index])].kind for index in proponents[:2]] == ["mislabeled", "outlier"]

    press(page, "s", then=f"Most similar to training example #{proponents[2]}")
    page.get_by_role("dialog").wait_for(state="hidden", timeout=TIMEOUT_MS)
    assert len(grid_indices(page, "similar")) == 10 and proponents[2] not in grid_indices(page, "similar")

    press(page, "u", then="Undone: 1 example", button="explore_undo")  # takes back the last verdict, the outlier
    flags = store.flags(RUN)
    assert flags[int(ids[proponents[0]])].kind == "mislabeled" and int(ids[proponents[1]]) not in flags

    for width in (1280, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        settle(page)
        assert page.evaluate(CUT_TEXT) == [], f"no text cut at {width} px"
        screenshot(page, screenshots / f"review-explore-{width}.png")
        press(page, "o", then="of 20 in this grid", button="open_next_proponent")  # the next proponent to review: the undone one
        dialog_shows(page, proponents[1])
        assert page.evaluate(CUT_TEXT) == [], f"no text cut in the dialog at {width} px"
        page.screenshot(path=str(screenshots / f"review-explore-dialog-{width}.png"))
        page.keyboard.press("Escape")
        page.get_by_role("dialog").wait_for(state="hidden", timeout=TIMEOUT_MS)
        settle(page)

    press(page, "o", then="of 20 in this grid", button="open_next_proponent")
    page.keyboard.press("g")  # show it on the Map
    page.wait_for_url(f"**example={proponents[1]}**", timeout=TIMEOUT_MS)
    page.get_by_role("heading", name="Map").wait_for(timeout=TIMEOUT_MS)


@pytest.mark.parametrize("width", [1280, 1920])
def test_compare_reads_without_cut_text(page, private_app, screenshots: Path, width: int):
    page.set_viewport_size({"width": width, "height": 1000})
    page.goto(f"{private_app.url}/compare?run={RUN}")
    page.get_by_text("agree on").first.wait_for(timeout=TIMEOUT_MS)
    styled(page)
    assert "rank correlation over all" in page.get_by_text("agree on").first.inner_text()
    assert page.evaluate(CUT_TEXT) == [], f"no text cut at {width} px"
    screenshot(page, screenshots / f"review-compare-{width}.png")
