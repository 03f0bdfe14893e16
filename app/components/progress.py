"""The core's progress(done, total) callbacks drawn as Streamlit progress bars."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import streamlit as st

ProgressFn = Callable[[int, int], None]


@contextmanager
def progress_bar(label: str, container=None, *, show_time: bool = False) -> Iterator[ProgressFn]:
    """A st.progress bar for the duration of a core call; yields the callback to pass it.

    The bar is redrawn only when the whole percentage changes (the core may call back once per
    batch), and removed when the block ends, whether the call succeeded or raised. show_time adds
    a spinner with the seconds elapsed above it, for calls whose steps are long (a replay of the
    whole training run reports once per block of queries).
    """
    target = container or st
    spinner = target.spinner(label, show_time=True) if show_time else nullcontext()
    with spinner:
        bar = target.progress(0.0, text="" if show_time else label)
        shown = {"percent": -1}

        def update(done: int, total: int) -> None:
            fraction = min(1.0, done / total) if total else 1.0
            percent = int(fraction * 100)
            if percent != shown["percent"]:
                shown["percent"] = percent
                bar.progress(fraction, text=f"{done} of {total}" if show_time else f"{label} ({done} of {total})")

        try:
            yield update
        finally:
            bar.empty()
