"""What a run supports, asked before a button is offered: retraining, order-keeping retrains, exact replay.

A page (or the CLI) asks `capabilities(run)` and shows an action the run cannot do disabled, with
the reason and what would enable it, instead of failing after the click.
"""
from __future__ import annotations

from dataclasses import dataclass

from .replay_engine import why_not_replayable
from .run import Run
from .training import why_not_retrainable


@dataclass(frozen=True)
class Capability:
    """One thing a run can or cannot do: reason is None when it can, else why not and what would enable it."""

    name: str
    label: str
    reason: str | None = None

    @property
    def supported(self) -> bool:
        """Whether the run can do it."""
        return self.reason is None


def _order_keeping_reason(run: Run) -> str | None:
    """Why the run's recorded batches cannot be trained on again with removed examples weighted 0, or None."""
    if run.record is None:
        return f"run {run.run_id!r} has no per-step training record: an order-keeping retrain trains on the recorded batches"
    return why_not_retrainable(run)


def capabilities(run: Run) -> dict[str, Capability]:
    """Every action that trains a run again, by name, with whether this run supports it."""
    order_keeping = _order_keeping_reason(run)
    found = [
        Capability("retrain", "retrain it on subsets (LDS ground truth, counterfactual check, out-of-fold probabilities)",
                   why_not_retrainable(run)),
        Capability("order_keeping", "retrain it in its recorded batch order (order-keeping LDS, smoothness check)", order_keeping),
        Capability("replay", "replay it exactly (the replay method)", why_not_replayable(run)),
    ]
    return {capability.name: capability for capability in found}
