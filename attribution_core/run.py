"""The old import path of runs/run.py: `from attribution_core.run import Run` gets the same module object."""
import sys

from .runs import run as _moved

sys.modules[__name__] = _moved
