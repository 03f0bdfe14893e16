"""Progress reporting: the callback every long loop takes, and a counter that feeds it."""
from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
"""progress(done, total): called as work advances; the CLI passes tqdm, the app its job runner."""


def no_progress(done: int, total: int) -> None:
    """The default progress callback: report nothing."""


def n_chunks(n_examples: int, batch_size: int) -> int:
    """How many chunks of batch_size cover n_examples."""
    return -(-n_examples // batch_size)


class Progress:
    """Counts finished steps of a job and reports them to a progress callback."""

    def __init__(self, callback: ProgressFn, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        """One more step done."""
        self.done += 1
        self.callback(self.done, self.total)
