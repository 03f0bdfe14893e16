"""`tdx app`'s server process: Streamlit's own command line, with the app's heavy imports warmed while it starts.

A page's first script run would otherwise import torch, scipy and the core (about 3 s on 2 cores)
while the first user waits. A thread imports them as soon as Streamlit itself is imported; the
server starts beside it and never waits on it.

    python -m app.serve run app/main.py --server.port 8501 ...   (what `tdx app` runs)
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading

WARM_MODULES = ("pandas", "torch", "plotly.graph_objects", "attribution_core.api", "attribution_core.jobs.kinds",
                "app.components.core_calls", "app.components.charts")
"""What every page imports on its first run. pandas (and numpy with it) first: plotly reads both from sys.modules without
the import lock whenever it builds a figure, so the window in which either is half imported is kept as short as it can be."""

WARM_THREAD = "tdx-warm-imports"
"""The warm-up thread's name."""


def warm() -> None:
    """Import WARM_MODULES (a failure is left for the page to report, where it will fail again with its context)."""
    for name in WARM_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def main() -> None:
    """Import Streamlit, start the warm-up thread, then run Streamlit's command line with this process's arguments."""
    # Streamlit first: importing it builds its plotly theme, and plotly takes numpy and pandas from sys.modules as they
    # are. With the thread started first, a pandas it had half imported broke the server's start (AttributeError:
    # partially initialized module 'pandas'), once in a loaded run of the browser tests.
    from streamlit.web.cli import main as streamlit_main

    threading.Thread(target=warm, name=WARM_THREAD, daemon=True).start()

    streamlit_main(args=sys.argv[1:], prog_name="streamlit")


if __name__ == "__main__":
    main()
