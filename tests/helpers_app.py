"""Driving the app headless with Streamlit's AppTest, shared by the page tests (a plain module, not a test module)."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
TIMEOUT = 120


def open_app(page: str | None = None, **query_params: str) -> AppTest:
    """A fresh session of the app (like a new browser tab) on a page, with URL query parameters; it must raise nothing."""
    app = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)
    app.query_params.update(query_params)
    app.run()
    if page is not None:
        app.switch_page(f"views/{page}.py").run()
    assert not app.exception, [exception.message for exception in app.exception]
    return app


def texts(app: AppTest) -> str:
    """Every markdown, caption (an image's too), subheader, alert and progress-bar text of the page, joined."""
    parts = [element.value for kind in ("markdown", "caption", "subheader", "title", "info", "error", "warning", "success")
             for element in getattr(app, kind)] + image_captions(app) + [bar.proto.text for bar in app.get("progress")]
    return "\n".join(str(part) for part in parts)


def image_captions(app: AppTest) -> list[str]:
    """The captions of the page's images, in page order (an image grid's cell captions are its images', images.py)."""
    return [image.caption for element in app.get("image") for image in element.proto.imgs if image.caption]


def button_keys(app: AppTest, prefix: str) -> list[str]:
    """Keys of the page's buttons that start with prefix, in page order."""
    return [button.key for button in app.button if button.key and button.key.startswith(prefix)]


def table_with(app: AppTest, column: str):
    """The first dataframe on the page that has this column."""
    return next(frame.value for frame in app.dataframe if column in frame.value.columns)


def place_of(app: AppTest, key: str) -> int:
    """The position, among the main area's top-level elements, of the one that holds widget `key` (a fragment's id is
    derived from its position: one that moves is another fragment to Streamlit)."""
    def holds(node) -> bool:
        return getattr(node, "key", None) == key or any(holds(child) for child in getattr(node, "children", {}).values())

    return next(index for index, node in app.main.children.items() if holds(node))
