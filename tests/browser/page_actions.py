"""What the browser tests do on a page and how long they wait (a plain module): settle, navigate, read widgets, screenshot."""
from __future__ import annotations

from pathlib import Path

from page_scripts import IMAGES_LOADED, NO_JOB_PANEL, SCRIPT_FINISHED

TIMEOUT_MS = 180_000
"""How long a step may take before a test fails: a page's script run, its images, a job the page queued (loaded machine)."""
FIRST_MAP_MS = 420_000
"""The first map of a server waits for its UMAP layout job: numba compiles UMAP in the worker first (about a minute
alone, several on a loaded machine)."""
MAX_SCREENSHOT_HEIGHT = 4000


def settle(page, timeout_ms: int = TIMEOUT_MS) -> None:
    """Wait until the script run has finished and every image on the page has loaded."""
    page.wait_for_function(SCRIPT_FINISHED, timeout=timeout_ms)
    page.wait_for_function(IMAGES_LOADED, timeout=timeout_ms)


def quiet(page, timeout_ms: int = TIMEOUT_MS) -> None:
    """Wait until the page waits for no job (none can end and redraw the page under a click), then settle."""
    page.wait_for_function(NO_JOB_PANEL, timeout=timeout_ms)
    settle(page, timeout_ms)


def screenshot(page, path: Path) -> None:
    """The whole page as a PNG: Streamlit scrolls inside its main block, so the window grows to fit it first."""
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": min(max(height, size["height"]), MAX_SCREENSHOT_HEIGHT)})
    settle(page)
    page.screenshot(path=str(path))
    page.set_viewport_size(size)


def keys(page, prefix: str) -> list[str]:
    """Widget keys on the page starting with prefix, in page order (Streamlit marks each keyed element st-key-<key>)."""
    return page.evaluate(
        """prefix => [...document.querySelectorAll(`[class*="st-key-${prefix}"]`)]
            .map(element => [...element.classList].find(name => name.startsWith(`st-key-${prefix}`)).slice(7))""",
        prefix,
    )


def selected(page, key: str) -> str:
    """The text a selectbox shows."""
    return page.locator(f".st-key-{key} input").input_value()


def cell_of(page, key: str):
    """The grid cell (image, caption, button) holding the button with this key."""
    return page.locator(f".st-key-{key}").locator("xpath=..")


def open_page(page, title: str) -> None:
    """Go to another page through the sidebar navigation."""
    page.locator("[data-testid=stSidebarNavLink]", has_text=title).click()
    page.get_by_role("heading", name=title).wait_for(timeout=TIMEOUT_MS)
    settle(page)


def results_shown(page) -> None:
    """Wait until the query's proponents are drawn (its block of scores may first be a job) and the script run has finished."""
    page.wait_for_function(
        """() => document.querySelectorAll('[class*="st-key-results_proponents_"]').length > 0
            && !document.querySelector('[class*="st-key-job_"]')""", timeout=TIMEOUT_MS)
    settle(page)


def grid_indices(page, grid: str) -> list[int]:
    """Training indices a grid shows, in page order (each cell's button is keyed <grid>_<index>)."""
    keys = page.evaluate(
        """grid => [...document.querySelectorAll(`[class*="st-key-${grid}_"]`)]
            .map(element => [...element.classList].find(name => name.startsWith(`st-key-${grid}_`)).slice(7 + grid.length + 1))""",
        grid,
    )
    return [int(key) for key in keys if key.isdigit()]
