"""Who is using this browser tab: an actor id for the flags store, so that undo takes back this session's actions only."""
from __future__ import annotations

import uuid

import streamlit as st

ACTOR_KEY = "actor"
"""Session-state key of the tab's actor id."""


def actor() -> str:
    """This session's actor id ("session-<hex>"), made on first use: pass it as `actor=` to every flag write and to undo."""
    if ACTOR_KEY not in st.session_state:
        st.session_state[ACTOR_KEY] = f"session-{uuid.uuid4().hex[:12]}"
    return st.session_state[ACTOR_KEY]
