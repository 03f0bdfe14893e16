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


class RemainingTime:
    """The time left of a job from the steps it has reported: honest, and never growing while its pace holds.

    feed(done, total, now) at every progress report (now: seconds on any clock, the same for every call); then
    finish (when the job should be done on that clock, or None before there is an estimate) and note (why the
    estimate changed the way it did, or None). The time left at a later moment t is max(0, finish - t).

    - No estimate before MIN_STEPS steps and MIN_SECONDS of this attempt: one slow first step (an import, a
      compilation) says little about the rest.
    - The projection is the steps left times the slower of the mean step time so far and that of the last
      RECENT steps, times MARGIN: when steps get faster the estimate is pessimistic, not optimistic.
    - The finish only moves earlier: finish = min(finish, now + projection). Between two reports the time left
      counts down, and a faster pace brings it closer; it never grows while the job runs at the pace seen.
    - Two things start it over, each with a note: a new total (the job's next phase), and a job that is still
      running when the finish it was given has passed (slower than any pace seen before).
    - Once done == total the time left is 0.
    - A pause the job takes on purpose (paused(seconds): it left the CPU to a page's job) moves the finish and the
      pace's start later by the pause, with a note: the time left holds still while the job waits.
    """

    MIN_STEPS = 3
    MIN_SECONDS = 2.0
    RECENT = 5
    MARGIN = 1.2
    NEXT_PHASE = "next phase: estimated again"
    SLOWER = "slower than estimated: estimated again"
    PAUSED = "paused while a page's job ran"

    def __init__(self) -> None:
        self.finish: float | None = None
        self.note: str | None = None
        self._total: int | None = None
        self._start: tuple[float, int] | None = None  # (time, done) where this phase's pace is measured from
        self._recent: list[tuple[float, int]] = []  # the last RECENT + 1 reports of this phase

    def feed(self, done: int, total: int, now: float) -> None:
        """One progress report: done of total steps at time now."""
        if total != self._total:
            if self._total is not None:
                self.note = self.NEXT_PHASE
            self._restart(done, total, now)
            return
        if done >= total:
            self.finish = now if self.finish is None else min(self.finish, now)
            return
        if self.finish is not None and now >= self.finish and done < total:
            self.note = self.SLOWER
            self._restart(done, total, now)
            return
        if self._recent and done <= self._recent[-1][1]:
            return  # no step finished since the last report: the countdown goes on
        self._recent = [*self._recent, (now, done)][-(self.RECENT + 1):]
        start_time, start_done = self._start
        if done - start_done < self.MIN_STEPS or now - start_time < self.MIN_SECONDS:
            return
        mean = (now - start_time) / (done - start_done)
        (first_time, first_done), (last_time, last_done) = self._recent[0], self._recent[-1]
        recent = (last_time - first_time) / (last_done - first_done) if last_done > first_done else mean
        projected = now + (total - done) * max(mean, recent) * self.MARGIN
        self.finish = projected if self.finish is None else min(self.finish, projected)

    def paused(self, seconds: float) -> None:
        """The job waited `seconds` on purpose: its finish and the pace's reference times move later by that much."""
        if seconds <= 0:
            return
        self.note = self.PAUSED
        if self.finish is not None:
            self.finish += seconds
        if self._start is not None:
            self._start = (self._start[0] + seconds, self._start[1])
        self._recent = [(time + seconds, done) for time, done in self._recent]

    def remaining(self, now: float) -> float | None:
        """Seconds left at time now (0 once past the finish), or None before there is an estimate."""
        return None if self.finish is None else max(0.0, self.finish - now)

    def _restart(self, done: int, total: int, now: float) -> None:
        self._total, self._start, self._recent, self.finish = total, (now, done), [(now, done)], None
        if done >= total:
            self.finish = now
