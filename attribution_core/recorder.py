"""The old import path of runs/recorder.py: `from attribution_core.recorder import Recorder` gets the same module object."""
import sys

from .runs import recorder as _moved

sys.modules[__name__] = _moved
