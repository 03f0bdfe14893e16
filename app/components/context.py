"""Where the app reads from (the workspace) and which run every page shows (kept in the URL)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from attribution_core.store import Workspace

WORKSPACE_ENV = "TDX_WORKSPACE"
"""Environment variable naming the workspace folder (set by `tdx app`); default ./workspace."""

RUN_KEY = "run"
"""Session-state key and URL query parameter of the current run."""


def workspace_root() -> Path:
    """The workspace folder the app shows."""
    return Path(os.environ.get(WORKSPACE_ENV, "workspace")).expanduser().resolve()


def run_picker() -> str | None:
    """The sidebar's run selector, kept in ?run= so that a link reopens the same run."""
    run_ids = Workspace(workspace_root()).run_ids()
    if not run_ids:
        st.sidebar.info(f"No runs in {workspace_root()} yet: train one on the Runs page, or run `tdx demo`.")
        return None
    return url_selectbox(
        "Run", run_ids, key=RUN_KEY, default=run_ids[0], target=st.sidebar,
        help="The trained model every page shows. It is kept in the page address, so a link reopens this view.",
    )


def select_run(run_id: str) -> None:
    """Make run_id the current run (use as an on_click / on_change callback, before the picker draws)."""
    st.session_state[RUN_KEY] = run_id


def current_run_id() -> str | None:
    """The id of the run chosen in the sidebar, or None when the workspace has none."""
    return st.session_state.get(RUN_KEY)


def seed_from_url(key: str, *, default: Any, parse: Callable[[str], Any], valid: Callable[[Any], bool]) -> Any:
    """Give the widget `key` its value before it draws, and return it: kept if still valid, else from ?key=, else `default`.

    The value lives in session state, which takes precedence over the widget's own default. The
    widget must still be drawn with the returned value as its default (index= or value=): a browser
    under load has sent back a selectbox's own default in place of its value (the load test saw a
    tab opened on ?run=fmnist-noisy flag an example of the first run, fmnist-mlp), and with the
    current value as the default that fallback changes nothing. url_selectbox (and methods.py's
    url_range_slider) do both. Widgets not drawn on every page also pass persist_state="session",
    so they keep their value across pages.
    """
    if key in st.session_state and valid(st.session_state[key]):
        return st.session_state[key]
    value = default
    if key in st.query_params:
        try:
            candidate = parse(st.query_params[key])
        except ValueError:
            candidate = None
        if candidate is not None and valid(candidate):
            value = candidate
    st.session_state[key] = value
    return value


def url_selectbox(label: str, options: list, *, key: str, default: Any, parse: Callable[[str], Any] = str,
                  to_text: Callable[[Any], str] = str, target: Any = None, **widget_options: Any) -> Any:
    """A selectbox kept in ?key=: seeded (seed_from_url), drawn with that value as its default, and written back as to_text(value)."""
    current = seed_from_url(key, default=default, parse=parse, valid=options.__contains__)
    chosen = (target or st).selectbox(label, options, index=options.index(current), key=key, **widget_options)
    publish_to_url(key, to_text(chosen))
    return chosen


def publish_to_url(key: str, text: str) -> None:
    """Write ?key=text into the page address, so that a link reopens this view."""
    if st.query_params.get(key) != text:
        st.query_params[key] = text
