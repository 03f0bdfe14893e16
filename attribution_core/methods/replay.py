"""Replay: exact attribution by differentiating through the recorded training run (MAGIC, Ilyas & Engstrom 2025).

    τ(z_q, z_i) = d f(z_q; θ_T) / d w_i  at w = at_weight (1: the run as trained)
with w_i example i's weight in its batches' losses (runs/replay_engine.py): positive = proponent (removing i,
w_i 1 -> 0, lowers f by about τ, to first order). Computed by reverse mode through every recorded
optimizer step, the queries of a block carried backward together. Exact for the run as it was
trained: no Hessian approximation, no stationarity assumption; the matching ground truth is the
order-keeping LDS (evaluation/lds.py, mode "order_keeping"), which retrains in the same batch order.

Runs it can replay: made by a training function (tdx's recipe or a user's loop recorded with
`tdx record`), SGD with momentum (Nesterov too), Adam or AdamW; augmentation, dropout and
BatchNorm are replayed (runs/replay_engine.py). `fit` replays the whole run once, checks the weights against
every stored checkpoint and keeps every ~√T-th state; `score` then costs one reverse pass per
block of queries (each segment recomputed from its kept state, then walked back; see
benchmarks/b7_replay.py). Under torchrun the queries are shared between the processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..distributed import sharded_rows
from ..errors import SettingsError
from ..numerics.inputs import AttributionInputs, TrainState
from ..runs.replay_engine import (
    ReplayedStates,
    ReplayPlan,
    metagradients,
    replay_plan,
    replayed_states,
    why_not_replayable,
)
from ..runs.run import Run
from ..validation import check_settings
from .base import Method


@dataclass
class ReplaySettings:
    """Every knob of replay."""

    state_version: ClassVar[int] = 3  # 3: kept states hold buffers too; 2: the kept states; 1 held only the step count
    start_stage: int = field(default=0, metadata={"help": (
        "attribute only from this training stage on (earlier steps held fixed; cheaper): 0 = the whole run")})
    at_weight: float = field(default=1.0, metadata={"help": (
        "the example weight the derivative is taken at: 1 = the run as trained; a subset ground truth keeping a fraction α of the examples "
        "is matched better at α")})
    query_block: int = field(default=32, metadata={"help": (
        "queries carried backward together (memory: this × parameters × optimizer moments)")})
    stride: int | None = field(default=None, metadata={"help": (
        "steps between kept states (memory against recomputation); None: about √(steps)")})

    def __post_init__(self) -> None:
        check_settings(self, start_stage=self.start_stage >= 0, at_weight=self.at_weight >= 0, query_block=self.query_block >= 1,
                       stride=self.stride is None or self.stride >= 1)


class Replay(Method):
    """Exact metagradients through the recorded run (see the module docstring)."""

    name = "replay"
    label = "replay (exact)"
    Settings = ReplaySettings
    max_parameters = 5_000_000
    shards_queries = True

    def __init__(self, settings: ReplaySettings | None = None, plan: ReplayPlan | None = None):
        super().__init__(settings)
        self.plan = plan

    @classmethod
    def unsupported_reason(cls, run: Run) -> str | None:
        """Why replay cannot attribute this run (too large, no record, an optimizer or layer it cannot replay), or None."""
        return super().unsupported_reason(run) or why_not_replayable(run)

    def prepare_inputs(self, inputs: AttributionInputs, run: Run, checkpoints: list[int]) -> tuple[AttributionInputs, list[str]]:
        """The inputs as they are; the replay plan (every recorded step) is built from the run."""
        self.plan = replay_plan(run, start_stage=self.settings.start_stage, device=inputs.device, task=inputs.task)
        notes = [f"replay differentiates at example weight {self.settings.at_weight:g}"] if self.settings.at_weight != 1 else []
        if self.settings.start_stage:
            notes.append(f"replay attributes stage {self.settings.start_stage} on: earlier training is held fixed")
        return inputs, notes

    def streams_training_set(self) -> bool:
        """A block of queries is carried backward through every recorded step: more than a pass over the training set."""
        return True

    def _plan(self) -> ReplayPlan:
        if self.plan is None:
            raise SettingsError("replay needs its plan: call prepare_inputs with the run (the front door does), or pass plan=")
        return self.plan

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """Replays the run once at the settings' example weight (checked against every stored checkpoint at weight 1): the states kept.

        The state holds ReplayedStates' tensors (final weights, every stride-th state, the
        weights and stride), so that scoring a block of queries costs its reverse pass only.
        """
        plan, s = self._plan(), self.settings
        return replayed_states(plan, s.at_weight, stride=s.stride, verify=s.at_weight == 1, progress=inputs.progress).to_tensors()

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train), positive = proponent: d f_q(θ_T)/d w_i.

        Under a process group every rank carries its contiguous share of the queries backward
        (in blocks of query_block) and the shares are gathered in order. inputs.progress hears of
        every replayed step of every block: a callback that raises stops the work between steps.
        """
        plan, s = self._plan(), self.settings
        states = ReplayedStates.from_tensors(state)

        def share(rows: slice) -> torch.Tensor:
            blocks = list(range(rows.start, rows.stop, s.query_block))
            scores = [torch.zeros(0, len(inputs.train_y), device=inputs.device)]  # on the device: NCCL gathers CUDA tensors
            for number, start in enumerate(blocks):
                stop = min(start + s.query_block, rows.stop)
                reported = lambda done, _, number=number: inputs.progress(number * plan.n_steps + done, len(blocks) * plan.n_steps)  # noqa: E731
                scores.append(metagradients(plan, query_x[start:stop], query_y[start:stop], states=states, progress=reported).float())
            return torch.cat(scores)

        return sharded_rows(len(query_y), share)
