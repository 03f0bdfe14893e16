"""tda-explorer's Streamlit entry point: page setup, the sidebar's run picker, and navigation.

Run it with `tdx app` (which sets TDX_WORKSPACE) or `streamlit run app/main.py`.

Adding a page: one script in views/ that draws the page when Streamlit runs it (its functions, then a call of its
render() at the end; widgets it shares with other pages go to components/), one Page in PAGES below (its script, title and
icon, in navigation order), and its AppTest test (tests/test_app_pages.py, with tests/helpers_app.py). Nothing else: the
navigation, the URL (/<script name>) and the sidebar come from PAGES, and tests/test_extensions.py checks that every
script in views/ is a declared page.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `streamlit run app/main.py` from a checkout that is not pip-installed

from app.components.context import run_picker, workspace_root  # noqa: E402
from app.components.jobs import begin_script_run, jobs_overview, start_workers  # noqa: E402

GRID_CSS = """<style>
/* Image grids (app/components/images.py draws each inside a container keyed grid_ and the grid key). */
/* Captions wrap between words, never inside one; a word wider than its cell is clipped, not split. */
/* Badges (a flag, a flipped label) wrap too, rather than end in an ellipsis: smaller (over Streamlit's inline size), without
   their icon (the colour and the words say it), so "mislabeled" and "flipped, was Dress" read whole in a cell at 1280 px;
   a word still wider than its cell breaks rather than being cut. */
/* A cell's caption is its image's (images.py): left-aligned like the rest of the page, not centred under the image. */
[class*="st-key-grid_"] [data-testid="stImageCaption"] { text-align: left; }
[class*="st-key-grid_"] [data-testid="stCaptionContainer"] { overflow: hidden; font-size: 0.8rem; }
[class*="st-key-grid_"] [data-testid="stCaptionContainer"] p { word-break: normal; overflow-wrap: normal; }
[class*="st-key-grid_"] [data-testid="stCaptionContainer"] .stMarkdownBadge {
    white-space: normal; overflow: visible; text-overflow: clip; overflow-wrap: anywhere; max-width: 100%;
    font-size: 0.7rem !important; padding: 0 0.25rem; line-height: 1.35;
}
[class*="st-key-grid_"] [data-testid="stCaptionContainer"] .stMarkdownBadge span[role="img"] { display: none !important; }
/* A cell's button shows its icon only; its label stays for screen readers (and tests), out of sight. */
[class*="st-key-grid_"] .stButton button [data-testid="stMarkdownContainer"] {
    position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); white-space: nowrap;
}
/* Every cell as tall as its row, its button (the cell's one keyed element) at the bottom: a row's buttons line up
   whatever the captions' lengths. */
[class*="st-key-grid_"] [data-testid="stColumn"] > [data-testid="stVerticalBlock"] > [data-testid="stLayoutWrapper"],
[class*="st-key-grid_"] [data-testid="stColumn"] > [data-testid="stVerticalBlock"] > [data-testid="stLayoutWrapper"] >
    [data-testid="stVerticalBlock"] {
    flex: 1 1 auto;
}
[class*="st-key-grid_"] [data-testid="stColumn"] [data-testid="stElementContainer"][class*="st-key-"] { margin-top: auto; }
/* Mislabels: a cell's tick box (keyed check_) goes down with its button, right above it, so a row's boxes line up too. */
[class*="st-key-grid_"] [data-testid="stColumn"] [class*="st-key-check_"] + [data-testid="stElementContainer"][class*="st-key-"] {
    margin-top: 0;
}
/* Toasts at the bottom right, not Streamlit's top right: there a flag's toast covers the Close button of the dialog it was
   flagged in, and stays while the pointer rests on it (the load test's Close clicks waited behind one for two minutes). */
[data-testid="stToastContainer"] { top: auto !important; bottom: 1rem; }
</style>"""
"""The few style rules Streamlit has no option for, drawn at the foot of the sidebar on every run (no '<' in the
rules or comments: an HTML sanitizer drops a style element whose text holds one). Drawn as a page element, not
with st.html's style-only path: that one goes to an event container, and a browser test caught a page drawn
without it."""

PAGE_ICON = "🔎"
"""The browser tab's icon. An emoji, which Streamlit draws as an inline SVG: a ':material/...:' page icon is fetched from
fonts.gstatic.com (the page and button icons come from the Material font Streamlit ships, the tab's does not)."""

# One script per page. Not named pages/: Streamlit would serve a pages/ folder's scripts without running main.py.
VIEWS_DIR = Path(__file__).resolve().parent / "views"


class Page(NamedTuple):
    """One page of the app: its script in views/, its title in the navigation, and its icon."""

    script: str
    title: str
    icon: str


PAGES = (
    Page("explore.py", "Explore", ":material/manage_search:"),
    Page("runs.py", "Runs", ":material/model_training:"),
    Page("mislabels.py", "Mislabels", ":material/label_off:"),
    Page("compare.py", "Compare", ":material/compare_arrows:"),
    Page("map.py", "Map", ":material/scatter_plot:"),
)
"""Every page, in navigation order; the first opens by default."""


def pages() -> list:
    """The app's pages as Streamlit's navigation takes them, the first one the default."""
    return [st.Page(VIEWS_DIR / page.script, title=page.title, icon=page.icon, default=number == 0)
            for number, page in enumerate(PAGES)]


def main() -> None:
    """Set up the page, the sidebar and the navigation, then run the chosen page."""
    st.set_page_config(page_title="tda-explorer", page_icon=PAGE_ICON, layout="wide")
    navigation = st.navigation(pages())
    start_workers()
    begin_script_run()
    st.sidebar.caption(f"Workspace `{workspace_root()}`")
    run_picker()
    with st.sidebar:
        jobs_overview()
    st.sidebar.markdown(GRID_CSS, unsafe_allow_html=True)
    navigation.run()


if __name__ == "__main__":  # Streamlit runs this script as __main__; a test imports it for PAGES without drawing anything
    main()
