"""`tdx app`'s server process: Streamlit's own command line, with the app's heavy imports warmed while it starts.

A page's first script run would otherwise import torch, scipy and the core (about 3 s on 2 cores)
while the first user waits. A thread imports them as soon as the process starts; Streamlit's
server starts beside it and never waits on it.

    python -m app.serve run app/main.py --server.port 8501 ...   (what `tdx app` runs)
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading

WARM_MODULES = ("torch", "pandas", "plotly.graph_objects", "attribution_core.api", "attribution_core.jobs.kinds",
                "app.components.core_calls", "app.components.charts")
"""What every page imports on its first run, heaviest first."""


def warm() -> None:
    """Import WARM_MODULES (a failure is left for the page to report, where it will fail again with its context)."""
    for name in WARM_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def main() -> None:
    """Start the warm-up thread, then Streamlit's command line with this process's arguments."""
    threading.Thread(target=warm, name="tdx-warm-imports", daemon=True).start()
    from streamlit.web.cli import main as streamlit_main

    streamlit_main(args=sys.argv[1:], prog_name="streamlit")


if __name__ == "__main__":
    main()
