"""First-use rough edges (issue 29, item 5) as a user meets them in Chromium: nothing fetched from the internet."""
from __future__ import annotations

import pytest
from test_browser import TIMEOUT_MS, settle

pytestmark = pytest.mark.browser

LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")
"""Where the app may load anything from: its own server, and what the page builds in memory."""

PAGES = (("/", "Proponents: training examples"), ("/runs", "Run fmnist-mlp"), ("/mislabels", "flagged of"),
         ("/compare", "agree on"), ("/map", "UMAP of the inputs"))
"""Each page, with a text it shows once its main content is drawn."""


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
    # a font or image the page could not load (Streamlit's own probes of /<page>/_stcore/health answer 404 by design, and a
    # script chunk still loading when the next page is opened is aborted: neither is a font or an icon)
    page.on("requestfailed", lambda request: failed.append(request.url) if request.resource_type in ("font", "image") else None)
    page.on("response", lambda response: failed.append(f"{response.url}: {response.status}")
            if response.status >= 400 and response.request.resource_type in ("font", "image") else None)
    page.on("console", lambda message: failed.append(message.text)
            if message.type == "error" and any(word in message.text.lower() for word in ("font", "icon")) else None)
    try:
        for path, shown in PAGES:
            page.goto(f"{app_url}{path}?run=fmnist-mlp")
            page.get_by_text(shown).first.wait_for(timeout=TIMEOUT_MS)
            settle(page)
            icons = page.evaluate("() => [...document.querySelectorAll('link[rel~=icon]')].map(link => link.href)")
            assert icons and all(icon.startswith(LOCAL) for icon in icons), f"{path}: the tab's icon comes from {icons}"
        assert outside == [], "requests that left the machine"
        assert failed == [], "failed loads (a font or icon the app could not fetch)"
    finally:
        context.close()
