"""The app as a user drives it in Chromium: explore a misprediction, flag a proponent, reload, review, compare, map."""
from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
from page_actions import FIRST_MAP_MS, TIMEOUT_MS, cell_of, keys, open_page, screenshot, selected, settle

from attribution_core.inspection import stored_map_layout
from attribution_core.runs.run import load_run

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect















def test_explore_flag_reload_review_and_compare(page, app_url, browser_workspace, screenshots: Path):
    started = time.monotonic()
    page.goto(app_url)
    page.get_by_text("Proponents: training examples").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    print(f"\nExplore opened on a fresh server, scores computed, in {time.monotonic() - started:.1f} s")

    misprediction = keys(page, "pick_")[1]  # mispredictions come first in the picker
    page.locator(f".st-key-{misprediction} button:visible").click()  # a button with a tooltip is drawn twice, once hidden
    query = misprediction.removeprefix("pick_")
    page.wait_for_url(f"**query={query}**", timeout=TIMEOUT_MS)
    settle(page)
    assert "→" in selected(page, "query"), "the chosen sample is a misprediction"
    proponents = keys(page, "results_proponents_")
    assert len(proponents) == 10
    assert page.locator("[data-testid=stImage] img").count() >= 12 + 20, "picker, proponents and opponents images"

    flagged = proponents[0]
    page.locator(f".st-key-{flagged} button:visible").click()
    dialog = page.get_by_role("dialog")
    index = int(flagged.removeprefix("results_proponents_"))
    dialog.get_by_text(f"Training example #{index}").wait_for(timeout=TIMEOUT_MS)
    dialog.get_by_role("button", name="Mislabeled").click()
    dialog.get_by_text("2 of 20 in this grid").wait_for(timeout=TIMEOUT_MS)  # a verdict moves on to the next example
    settle(page)
    # the verdict buttons are updated in place for the next example, so the keyboard focus stays where it was (a button
    # drawn anew had taken it along, and an Esc pressed before the dialog found it again closed nothing)
    expect(dialog.get_by_role("button", name="Mislabeled")).to_be_focused()
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden", timeout=TIMEOUT_MS)
    # The verdict reran the dialog alone; the grid shows the flag after the full run that closing starts, which
    # settle() may look for before it has begun: wait for the badge itself.
    expect(cell_of(page, flagged)).to_contain_text("mislabeled", timeout=TIMEOUT_MS)
    settle(page)

    started = time.monotonic()
    page.reload()
    page.get_by_text("Proponents: training examples").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    print(f"Explore reopened (scores cached) in {time.monotonic() - started:.1f} s")
    assert selected(page, "query").startswith(f"test {query} "), "the URL reopens the same sample"
    assert "mislabeled" in cell_of(page, flagged).inner_text(), "the flag survives a reload"
    screenshot(page, screenshots / "explore.png")

    open_page(page, "Mislabels")
    page.get_by_text("1 flagged of 1 reviewed").wait_for(timeout=TIMEOUT_MS)
    with page.expect_download() as download:
        page.locator(".st-key-export_csv button:visible").click()  # a button with a tooltip is drawn twice, once hidden
    exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    example_id = int(load_run(browser_workspace, "fmnist-mlp").datasets()[0].ids[index])
    assert [(row["train_index"], row["example_id"], row["kind"]) for row in exported] == [(str(index), str(example_id), "mislabeled")]
    page.get_by_text("Suspect 1 of").wait_for()
    page.keyboard.press("n")
    page.get_by_text("Suspect 2 of").wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("f")
    page.get_by_text("1 flagged of 2 reviewed").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    screenshot(page, screenshots / "mislabels.png")

    open_page(page, "Compare")
    page.get_by_text("agree on").first.wait_for(timeout=TIMEOUT_MS)
    # ten subsets, two methods: the second method's first queries may still be scored by a job when the first shows
    page.wait_for_function("() => document.querySelectorAll('.st-key-lds_scatter .scatterlayer .point').length === 2 * 10",
                           timeout=TIMEOUT_MS)
    screenshot(page, screenshots / "compare.png")


def test_runs_page_shows_the_training_timeline(page, app_url, screenshots: Path):
    page.goto(f"{app_url}/runs?run=fmnist-two-stage")
    page.get_by_text("Run fmnist-two-stage").wait_for(timeout=TIMEOUT_MS)
    page.locator(".st-key-timeline .scatterlayer .point").first.wait_for(timeout=TIMEOUT_MS)
    settle(page)
    assert page.locator(".st-key-timeline .scatterlayer .point").count() >= 6, "one marker per checkpoint"
    screenshot(page, screenshots / "runs.png")


MAX_SELECTION_SHOWN = 32
"""The most selected training examples the Map's grid shows (views/map.py, which runs its page when imported)."""

LASSO = ((0.05, 0.05), (0.45, 0.05), (0.45, 0.95), (0.05, 0.95), (0.05, 0.06))
"""The lasso drawn on the Map, as fractions of the plot area from its top left: about the rectangle [0.05, 0.45] x [0.05, 0.95]."""

AXIS_RANGES = """() => { const plot = document.querySelector('.st-key-map_chart .js-plotly-plot');
    return [plot._fullLayout.xaxis.range, plot._fullLayout.yaxis.range]; }"""
"""The data ranges the Map's plot area spans, [[x0, x1], [y0, y1]]."""


def lassoed(positions: np.ndarray, ranges, margin: float) -> np.ndarray:
    """(n,) bool: which points (n, 2) lie inside LASSO's rectangle grown by margin (a fraction of the plot area; negative shrinks)."""
    (x0, x1), (y0, y1) = ranges
    across, down = (positions[:, 0] - x0) / (x1 - x0), (y1 - positions[:, 1]) / (y1 - y0)
    return (0.05 - margin < across) & (across < 0.45 + margin) & (0.05 - margin < down) & (down < 0.95 + margin)


def test_map_selection_shows_the_examples_inside_the_lasso(page, app_url, browser_workspace, screenshots: Path):
    page.goto(f"{app_url}/map?run=fmnist-noisy")
    chart = page.locator(".st-key-map_chart")
    chart.locator(".scatterlayer .point").first.wait_for(timeout=FIRST_MAP_MS)
    settle(page)
    chart.hover()
    chart.locator('.modebar-btn[data-title="Lasso Select"]').click()  # a drag draws a box by default
    box = chart.locator(".nsewdrag").first.bounding_box()
    left, top, width, height = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(left + LASSO[0][0] * width, top + LASSO[0][1] * height)
    page.mouse.down()
    for x, y in LASSO[1:]:
        page.mouse.move(left + x * width, top + y * height, steps=8)
    page.mouse.up()
    line = page.get_by_text(re.compile(r"Selection: \d+ training examples, \d+ test samples")).first
    line.wait_for(timeout=TIMEOUT_MS)  # a rerun may briefly show the old and new line
    page.locator("[data-testid=stImage] img").first.wait_for(timeout=TIMEOUT_MS)
    settle(page)
    n_train, n_test = map(int, re.search(r"Selection: (\d+) training examples, (\d+) test samples", line.inner_text()).groups())
    layout = stored_map_layout(load_run(browser_workspace, "fmnist-noisy"))  # the map the page drew (the last checkpoint's)
    ranges = page.evaluate(AXIS_RANGES)
    # points within a hundredth of the lasso's edge may fall either way: inside it must be selected, beyond it must not
    sure_train, maybe_train = (np.flatnonzero(lassoed(layout.train, ranges, margin)) for margin in (-0.01, 0.01))
    sure_test, maybe_test = (np.flatnonzero(lassoed(layout.test, ranges, margin)) for margin in (-0.01, 0.01))
    assert 0 < len(sure_train) <= n_train <= len(maybe_train) and len(sure_test) <= n_test <= len(maybe_test)
    shown = sorted(int(key.removeprefix("map_selection_")) for key in keys(page, "map_selection_"))
    assert len(shown) == min(n_train, MAX_SELECTION_SHOWN) and set(shown) <= set(maybe_train)
    assert set(sure_train[sure_train <= shown[-1]]) <= set(shown), "the grid shows the selection's first examples by index"
    screenshot(page, screenshots / "map.png")


GRID_BUTTONS = """() => [...document.querySelectorAll('[class*="st-key-grid_"] .stButton button')]
    .filter(button => button.checkVisibility())
    .map(button => ({height: button.getBoundingClientRect().height, overflowing: button.scrollWidth > button.clientWidth + 1,
                     label: button.querySelector('[data-testid=stMarkdownContainer]')?.getBoundingClientRect().width ?? 0}))"""
"""Every visible button of the page's image grids: its height, whether its content overflows it, the width its label takes."""


@pytest.mark.parametrize("width", [1280, 1920])
def test_grid_buttons_keep_to_one_line_at_common_widths(page, app_url, screenshots: Path, width: int):
    page.set_viewport_size({"width": width, "height": 1000})
    for path, name in (("/?run=fmnist-mlp", "explore"), ("/mislabels?run=fmnist-noisy", "mislabels")):
        page.goto(app_url + path)
        page.locator('[class*="st-key-grid_"] .stButton button').first.wait_for(timeout=TIMEOUT_MS)
        settle(page)
        buttons = page.evaluate(GRID_BUTTONS)
        assert buttons, f"{name}: the grids have buttons"
        assert all(button["height"] < 44 and not button["overflowing"] for button in buttons), f"{name} at {width} px: {buttons[:3]}"
        assert all(button["label"] <= 1 for button in buttons), "icons only: no words to break"
        screenshot(page, screenshots / f"grids-{name}-{width}.png")
