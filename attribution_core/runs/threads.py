"""Small models train on one CPU thread: faster on a busy machine, and float sums that do not depend on the thread count."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SMALL_MODEL_PARAMETERS = 1_000_000
"""Below this size a training step is too small to share between threads: one thread is faster
(several times so on a busy machine), and pinning it makes weights independent of the caller's
thread settings."""


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch on one CPU thread inside the block (when enabled), restoring the caller's setting afterwards.

    Float sums then do not depend on the thread count, and the small models that training and
    evaluation run many times train as fast or faster: on 2 cores an idle machine gains nothing
    from a second thread, and a busy one made threaded retraining 10-100x slower in our measurements.
    """
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_small(model: nn.Module) -> bool:
    """Whether a model trains faster on one thread (see SMALL_MODEL_PARAMETERS)."""
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
