"""Every attribution method, by the name the CLI, the app, stored results and the benchmarks use.

Adding a method: one module with a `Method` subclass (methods/base.py says what it declares),
one line in METHODS below, and its test against a direct computation. Nothing else: the module
needs no place in LAYERS ("*"), and everything else reads the declarations: the front door (its
settings key the stored state), `tdx attribute --method` and its help, the app's method choices
(jobs/ready.offered_methods, which unsupported_reason filters), its checkpoint picker
(checkpoint_policy), its score wording (estimates_removal) and segments (has_segments), the jobs
(fit and scores by method name), the mislabel rankings (a "self_influence:<name>" ranking where
has_self_influence) and the benchmarks. tests/test_extensions.py registers a method and checks
that the CLI, the front door and the app's pages take it.
"""
from __future__ import annotations

from ..errors import SettingsError
from .base import Method
from .baselines import GradientCosine, GradientDot, RepresentationSimilarity
from .exact import ExactInfluence
from .influence import Influence, KfacInfluence
from .replay import Replay
from .source import Source
from .tracin import TracIn
from .trak import Trak

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (Trak, Source, Influence, KfacInfluence, TracIn, GradientDot, GradientCosine, RepresentationSimilarity, ExactInfluence,
                   Replay)
}
"""Every method the front door knows, in the order the CLI and the app list them."""


LAYERS = (("base", "kronecker_settings"), ("tracin", "exact"), ("*",), ("",))
"""This package's modules bottom up ("*": every method module not named; "" is this __init__): a new method module
needs no entry here."""


def method_class(name: str) -> type[Method]:
    """The method class of a name, or a SettingsError listing the names there are."""
    if name not in METHODS:
        raise SettingsError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
