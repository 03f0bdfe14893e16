"""tda-explorer's Streamlit entry point: page setup, the sidebar's run picker, and navigation.

Run it with `tdx app` (which sets TDX_WORKSPACE) or `streamlit run app/main.py`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `streamlit run app/main.py` from a checkout that is not pip-installed

from app.components.context import run_picker, workspace_root  # noqa: E402

# One script per page. Not named pages/: Streamlit would serve a pages/ folder's scripts without running main.py.
VIEWS_DIR = Path(__file__).resolve().parent / "views"


def pages() -> list:
    """The app's pages, Explore first (the default)."""
    return [
        st.Page(VIEWS_DIR / "explore.py", title="Explore", icon=":material/manage_search:", default=True),
        st.Page(VIEWS_DIR / "runs.py", title="Runs", icon=":material/model_training:"),
        st.Page(VIEWS_DIR / "mislabels.py", title="Mislabels", icon=":material/label_off:"),
        st.Page(VIEWS_DIR / "compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page(VIEWS_DIR / "map.py", title="Map", icon=":material/scatter_plot:"),
    ]


def main() -> None:
    """Set up the page, the sidebar and the navigation, then run the chosen page."""
    st.set_page_config(page_title="tda-explorer", page_icon=":material/manage_search:", layout="wide")
    navigation = st.navigation(pages())
    st.sidebar.caption(f"Workspace `{workspace_root()}`")
    run_picker()
    navigation.run()


main()
