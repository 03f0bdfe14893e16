"""Bulk review in Chromium (issue 20): box-select on the Map and flag at once, a verdict by key on Mislabels and its undo
by key, the queue filtered to flagged, both exports read back in their documented layouts; the Map's link and colours.

Screenshots at 1280 and 1920 px go to test-artifacts/screenshots/ (review-*.png).
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from page_actions import FIRST_MAP_MS, TIMEOUT_MS, open_page, quiet, settle

from attribution_core.annotations import Annotations
from attribution_core.runs.run import load_run

pytestmark = pytest.mark.browser

WIDTHS = (1280, 1920)

OVERFLOWING = """() => [...document.querySelectorAll(['.stButton button', '.stDownloadButton button', '.stMarkdownBadge',
                                                      '[data-testid=stButtonGroup]', '.stSelectbox input']
                                                     .map(selector => `[data-testid=stMain] ${selector}`).join(', '))]
    .filter(element => element.checkVisibility() && element.scrollWidth > element.clientWidth + 1)
    .map(element => element.innerText || element.value)"""
"""The visible buttons, badges, button groups (pills, segmented controls) and selectboxes of the page whose text is wider
than they are: cut off with an ellipsis, or spilling."""

BOXES_OVERLAP = """key => {
    const chart = document.querySelector(`.st-key-${key}`);
    const bar = chart.querySelector('.colorbar'), legend = chart.querySelector('.legend');
    if (!bar || !legend) return null;
    const a = bar.getBoundingClientRect(), b = legend.getBoundingClientRect();
    return !(a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top);
}"""
"""Whether a chart's colour bar and legend overlap (null when it lacks one of them)."""




def at_widths(page, screenshots: Path, name: str) -> None:
    """A screenshot of the whole page at each of WIDTHS, after checking that no button or badge text is cut off there."""
    size = page.viewport_size
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        settle(page)
        height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")  # at this width
        page.set_viewport_size({"width": width, "height": min(max(height, 900), 5000)})
        settle(page)
        page.wait_for_timeout(300)  # plotly redraws its charts after a resize (a layout pass, not a script run)
        assert page.evaluate(OVERFLOWING) == [], f"{name} at {width} px"
        page.screenshot(path=str(screenshots / f"review-{name}-{width}.png"))
    page.set_viewport_size(size)




def box_select(page, chart_key: str, corner: tuple[float, float], opposite: tuple[float, float]) -> None:
    """Choose plotly's box select in the chart's mode bar and drag a box between two corners (fractions of the plot area)."""
    chart = page.locator(f".st-key-{chart_key}")
    chart.hover()
    chart.locator('.modebar-btn[data-title="Box Select"]').click()
    area = chart.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(area["x"] + corner[0] * area["width"], area["y"] + corner[1] * area["height"])
    page.mouse.down()
    page.mouse.move(area["x"] + opposite[0] * area["width"], area["y"] + opposite[1] * area["height"], steps=12)
    page.mouse.up()


def undo_label(page, examples: int) -> None:
    """Wait until the undo button offers to take back `examples` examples (this tab's last action)."""
    page.locator(".st-key-mislabels_undo button:visible", has_text=f"Undo ({examples} example").wait_for(timeout=TIMEOUT_MS)


def test_bulk_flag_a_box_selection_undo_a_key_verdict_filter_to_flagged_and_export(page, private_app, screenshots: Path):
    run = load_run(private_app.workspace, "fmnist-noisy")
    train_set = run.datasets()[0]
    store = Annotations(private_app.workspace.annotations_path)
    page.goto(f"{private_app.url}/map?run=fmnist-noisy")
    page.locator(".st-key-map_chart .scatterlayer .point").first.wait_for(timeout=FIRST_MAP_MS)
    settle(page)

    box_select(page, "map_chart", (0.05, 0.05), (0.5, 0.5))
    selection = page.get_by_text(re.compile(r"Selection: \d+ training examples")).first
    selection.wait_for(timeout=TIMEOUT_MS)
    n_selected = int(re.search(r"Selection: (\d+) training", selection.inner_text()).group(1))
    assert n_selected > 0
    page.locator(".st-key-map_flag_selection button:visible").click()
    page.locator(".st-key-map_undo button:visible", has_text=f"Undo ({n_selected} example").wait_for(timeout=TIMEOUT_MS)
    after_bulk = store.flags("fmnist-noisy")
    assert len(after_bulk) == n_selected and {flag.kind for flag in after_bulk.values()} == {"mislabeled"}
    at_widths(page, screenshots, "map-selection")

    open_page(page, "Mislabels")
    page.get_by_text(f"{n_selected} flagged of {n_selected} reviewed").wait_for(timeout=TIMEOUT_MS)
    undo_label(page, n_selected)
    # The flags queued a cleaning prediction, whose end reruns the whole page: keys go to a page that waits for nothing
    quiet(page)
    suspect = int(re.search(r"training example #(\d+)", page.get_by_text(re.compile(r"^training example #\d+$")).inner_text()).group(1))
    page.keyboard.press("o")
    undo_label(page, 1)
    assert store.flags("fmnist-noisy")[int(train_set.ids[suspect])].kind == "outlier"
    settle(page)  # the verdict's run has drawn the whole review area: the next key acts on the page it shows
    page.keyboard.press("u")
    undo_label(page, n_selected)  # the verdict is taken back; the bulk flag before it is the last action again
    assert store.flags("fmnist-noisy") == after_bulk

    page.locator(".st-key-mislabels_show button:visible", has_text="mislabeled").click()
    page.get_by_text(f"Suspect 1 of {n_selected}").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    at_widths(page, screenshots, "mislabels-flagged")

    flagged = {index for index, example_id in enumerate(train_set.ids) if int(example_id) in after_bulk}
    with page.expect_download() as download:
        page.locator(".st-key-export_cleanlab button:visible").click()
    assert download.value.suggested_filename == "fmnist-noisy-label_issues.zip"
    mask_archive = zipfile.ZipFile(download.value.path())
    mask = np.load(io.BytesIO(mask_archive.read("label_issues.npy")), allow_pickle=False)
    assert mask.dtype == bool and mask.shape == (len(train_set),) and set(np.flatnonzero(mask)) == flagged
    assert json.loads(mask_archive.read("label_issues.npy.json"))["example_id"] == train_set.ids.tolist()

    with page.expect_download() as download:
        page.locator(".st-key-export_fiftyone button:visible").click()
    assert download.value.suggested_filename == "fmnist-noisy-flags.zip"
    archive = zipfile.ZipFile(download.value.path())
    metadata = json.loads(archive.read("fmnist-noisy-flags/metadata.json"))
    samples = json.loads(archive.read("fmnist-noisy-flags/samples.json"))["samples"]
    assert metadata["media_type"] == "image" and metadata["info"]["classes"] == list(train_set.class_names)
    assert sorted(sample["train_index"] for sample in samples) == sorted(flagged)
    assert all(sample["tags"] == ["mislabeled"] and f"fmnist-noisy-flags/{sample['filepath']}" in archive.namelist()
               and sample["ground_truth"] == {"_cls": "Classification",
                                              "label": train_set.class_names[int(train_set.y[sample["train_index"]])]}
               for sample in samples)


def test_map_link_marks_the_example_and_influence_colours_keep_legend_and_colour_bar_apart(page, private_app, screenshots: Path):
    page.goto(f"{private_app.url}/map?run=fmnist-mlp&example=42")
    page.get_by_text("Linked example: training example #42").wait_for(timeout=FIRST_MAP_MS)
    page.locator(".st-key-map_chart .legendtext", has_text="train #42 (linked)").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    page.locator(".st-key-map_selection_42 button:visible").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Training example #42").wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden", timeout=TIMEOUT_MS)

    page.locator(".st-key-map_colour button:visible", has_text="influence on a test sample").click()
    page.locator(".st-key-map_chart .colorbar").wait_for(timeout=TIMEOUT_MS)
    settle(page)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(300)
        assert page.evaluate(BOXES_OVERLAP, "map_chart") is False, f"colour bar and legend overlap at {width} px"
    at_widths(page, screenshots, "map-influence")
