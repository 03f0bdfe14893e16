"""First-use rough edges (issue 29, item 5) as a user meets them in Chromium: a grid's captions and images change together,
and nothing is fetched from the internet."""
from __future__ import annotations

import pytest
from page_actions import FIRST_MAP_MS, TIMEOUT_MS, grid_indices, results_shown, selected, settle

pytestmark = pytest.mark.browser

LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")
"""Where the app may load anything from: its own server, and what the page builds in memory."""

PAGES = (("/", "Proponents: training examples", TIMEOUT_MS), ("/runs", "Run fmnist-mlp", TIMEOUT_MS),
         ("/mislabels", "flagged of", TIMEOUT_MS), ("/compare", "agree on", TIMEOUT_MS), ("/map", "UMAP of the inputs", FIRST_MAP_MS))
"""Each page, with a text it shows once its main content is drawn and how long that may take (the run's first map is a job)."""


def test_no_page_fetches_anything_from_the_internet(browser, app_url):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    outside, failed = [], []

    def local_only(route) -> None:
        """Abort and remember a request that leaves the machine; let the app's own through."""
        if route.request.url.startswith(LOCAL):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", local_only)
    page = context.new_page()
    # a font the page could not load (Streamlit's own probes of /<page>/_stcore/health answer 404 by design, a script chunk
    # still loading when the next page is opened is aborted, and an image of a run the server has moved past is gone: none
    # is a font or an icon; the tab's icon is checked below)
    page.on("requestfailed", lambda request: failed.append(request.url) if request.resource_type == "font" else None)
    page.on("response", lambda response: failed.append(f"{response.url}: {response.status}")
            if response.status >= 400 and response.request.resource_type == "font" else None)
    page.on("console", lambda message: failed.append(message.text)
            if message.type == "error" and any(word in message.text.lower() for word in ("font", "icon")) else None)
    try:
        for path, shown, timeout in PAGES:
            page.goto(f"{app_url}{path}?run=fmnist-mlp")
            page.get_by_text(shown).first.wait_for(timeout=timeout)
            settle(page)
            icons = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(link => link.href)")
            assert icons and all(icon.startswith(LOCAL) for icon in icons), f"{path}: the tab's icon comes from {icons}"
        assert outside == [], "requests that left the machine"
        assert failed == [], "failed loads (a font or icon the app could not fetch)"
    finally:
        context.close()


WATCH_CELLS = """() => {
    const observe = () => window.__cells.push([...document.querySelectorAll('[data-testid=stImage]')]
        .filter(image => image.querySelector('[data-testid=stImageCaption]'))
        .map(image => [image.querySelector('[data-testid=stImageCaption]').innerText.match(/#\\d+|test \\d+/)?.[0] ?? null,
                       image.querySelector('img').alt, image.querySelector('img').src.slice(0, 5)]));
    window.__cells = [];
    window.__watch = new MutationObserver(observe);
    window.__watch.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
    const frame = () => { observe(); window.__frame = requestAnimationFrame(frame); };
    frame();
}"""
"""Record, at every change of the page and every frame, each captioned image's example in its caption (#N, or test N on
the query's card), its image's alt text and the start of its image's address."""

STOP_WATCHING = """() => { window.__watch.disconnect(); cancelAnimationFrame(window.__frame); return window.__cells; }"""


def test_after_next_every_caption_stays_with_its_own_image(page, app_url):
    page.goto(f"{app_url}/?run=fmnist-mlp")
    results_shown(page)
    for _ in range(3):
        before = selected(page, "query")
        page.locator(".st-key-query_next button:enabled").first.wait_for(timeout=TIMEOUT_MS)
        page.evaluate(WATCH_CELLS)
        page.keyboard.press("n")
        page.wait_for_function("before => document.querySelector('.st-key-query input').value !== before", arg=before,
                               timeout=TIMEOUT_MS)
        results_shown(page)
        observations = page.evaluate(STOP_WATCHING)
        cells = [cell for observation in observations for cell in observation if cell[0] is not None]
        assert any(cell[0].startswith("test ") for cell in cells) and any(cell[0].startswith("#") for cell in cells), \
            "the query's card and the grids were watched"
        assert [cell for cell in cells if cell[1] != cell[0]] == [], "a caption under another example's image"
        assert {cell[2] for cell in cells} == {"data:"}, "each image comes inside its element, nothing to fetch"
        final = [cell[1] for cell in observations[-1]]
        shown = [f"#{index}" for grid in ("results_proponents", "results_opponents") for index in grid_indices(page, grid)]
        assert set(shown) <= set(final), "the settled grids show the new sample's examples"


MAP_LAYOUT = """() => {
    const plot = document.querySelector('.st-key-map_chart .js-plotly-plot');
    return {dragmode: plot._fullLayout.dragmode,
            legend: [...plot.querySelectorAll('.legend .traces')].map(
                entry => [entry.querySelector('.legendtext').textContent, entry.querySelector('.legendpoints path').getAttribute('d')])};
}"""
"""The map's drag mode, and each legend entry's text with the outline of its marker as drawn."""


def test_the_map_legend_shows_the_shapes_and_a_drag_draws_a_box(page, app_url):
    page.goto(f"{app_url}/map?run=fmnist-mlp")
    page.locator(".st-key-map_chart .legendtext", has_text="training examples").wait_for(timeout=FIRST_MAP_MS)
    settle(page)
    drawn = page.evaluate(MAP_LAYOUT)
    assert drawn["dragmode"] == "select"
    # plotly draws a circle marker with arcs (A) and a diamond with straight lines (L) only
    shapes = {name: "circle" if "A" in outline else "diamond" if "L" in outline else outline for name, outline in drawn["legend"]}
    assert shapes.pop("test samples") == "diamond" and shapes.pop("training examples") == "circle"
    assert set(shapes.values()) == {"circle"} and len(shapes) == 10, "one entry per class, in the colour of its circles"
