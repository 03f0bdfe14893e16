"""The core's progress(done, total) callbacks drawn as Streamlit progress bars."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import streamlit as st

ProgressFn = Callable[[int, int], None]


@contextmanager
def progress_bar(label: str, container=None) -> Iterator[ProgressFn]:
    """A st.progress bar for the duration of a core call; yields the callback to pass it.

    The bar is redrawn only when the whole percentage changes (the core may call back once per
    batch), and removed when the block ends, whether the call succeeded or raised.
    """
    bar = (container or st).progress(0.0, text=label)
    shown = {"percent": -1}

    def update(done: int, total: int) -> None:
        fraction = min(1.0, done / total) if total else 1.0
        percent = int(fraction * 100)
        if percent != shown["percent"]:
            shown["percent"] = percent
            bar.progress(fraction, text=f"{label} ({done} of {total})")

    try:
        yield update
    finally:
        bar.empty()
