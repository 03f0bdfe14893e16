"""A training loop written once as a function of a session, which tdx can call again: to record, retrain and replay.

    def train(session: TrainingSession) -> None:
        model = session.model                                    # the run's factory, initialised from session.seed
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        model.train()
        for epoch in range(int(session.options.get("epochs", 6))):
            for batch in session.batches(64, augment=augment):   # augment(x, generator) -> x, drawn from the step's generator
                losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
                optimizer.zero_grad()
                batch.loss(losses).backward()                     # Σ w_i ℓ_i / |B|: a removed example weighs 0
                optimizer.step()
                session.step(optimizer, batch, losses)
            session.checkpoint()

`tdx record package.module:train RUN --model package.module:factory --data sample` (or
`record_run` in Python) calls it once and records the run; every retrain calls it again with
another session: the LDS ground truth, the counterfactual and smoothness checks, out-of-fold
probabilities and a cleaning experiment. The session, not the loop, decides:
- which rows a pass draws and in which order: fresh draws of the kept rows from the session's
  data-order generator (a reshuffled retrain, or the run itself), or the run's recorded batches
  in their order with removed examples weighted 0 in their slots (an order-keeping retrain);
- each step's randomness: `augment(x, generator)` gets a generator seeded from (seed, step), and
  the global torch RNG (dropout) is seeded from (seed, step) while the step's batch is in hand, so
  a retrain with the run's seed draws every crop, flip and dropout mask again (replay too);
- the labels (a cleaning experiment relabels some examples) and the model's initial weights.
The loop multiplies its per-example losses by the batch's weights (`batch.loss`). BatchNorm:
a weight-0 example keeps its slot, so it still counts in its batch's statistics, in the
order-keeping retrain and in replay alike (the derivative with respect to a loss weight).

A step's loop body may use the batch, its model and optimizer, and the global torch RNG (which
the session seeds); randomness drawn elsewhere (numpy, Python's random, a generator of its own)
is not the session's to replay: retraining with the run's seed still repeats it when it is
seeded, but replay refuses such a run (its check against the recorded checkpoints fails).
"""
from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import SettingsError, TdxError
from ..progress import ProgressFn, no_progress
from ..task import Task
from .record import TrainingRecord
from .run import Recipe
from .threads import is_small, one_thread

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""augment(x (B, ...), generator) -> x': a batch's random transform, drawn only from the (CPU) generator it is given."""

TrainingFunction = Callable[["TrainingSession"], Any]
"""A training loop as a function of its session (see the module docstring)."""

STREAMS = {"function": 0, "augment": 1, "dropout": 2}
"""The independent random streams of a session: the function's own start, each step's augmentation, each step's dropout."""


class TrainingFunctionError(TdxError):
    """A training function raised: its own bug, which the same call would raise again."""


def step_seed(seed: int, step: int, stream: str) -> int:
    """The seed of one step's draws from one stream (step 0: the function's start): the same in every retrain with `seed`."""
    return int(np.random.SeedSequence([seed, step, STREAMS[stream]]).generate_state(1)[0])


def import_path(function: Callable[..., Any], what: str) -> str:
    """"package.module:function" of an importable top-level function, or a SettingsError saying why it cannot be found again."""
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not callable(function) or module in (None, "__main__") or not qualname or "." in qualname:
        raise SettingsError(f"{what} {function!r} cannot be found again by name (a script's __main__, a lambda, or defined inside "
                            "a function or class): define it at the top level of an importable module")
    return f"{module}:{qualname}"


@dataclass
class Batch:
    """One step's batch, as the session hands it out.

    rows: (B,) int64 training-set rows (CPU); x: (B, ...) inputs on the session's device, augmented;
    y: (B,) labels; step: the 1-based step this batch is for; number / of: its place in its pass.
    """

    rows: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    step: int
    number: int
    of: int
    _weights: torch.Tensor = field(repr=False)
    weighed: bool = field(default=False, repr=False)
    """Whether the loop used the weights (batch.loss or batch.weights): a loop that ignores them cannot remove examples."""

    @property
    def weights(self) -> torch.Tensor:
        """(B,) float32 on the device: 1, or 0 for an example an order-keeping retrain removes (it keeps its slot)."""
        self.weighed = True
        return self._weights

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The batch's training loss Σ w_i ℓ_i / |B| from per-example losses (B,): what `backward` is called on."""
        if losses.shape != (len(self.rows),):
            raise SettingsError(f"batch.loss: give one loss per example, shape ({len(self.rows)},), not {tuple(losses.shape)} "
                                "(reduction='none')")
        return (losses * self.weights.to(losses.dtype)).sum() / len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class Sink(Protocol):
    """Where a session's steps go: the Recorder (a run recorded), or a collector of the trainer's own (training.py)."""

    def stage(self, name: str) -> None: ...

    def step(self, optimizer: torch.optim.Optimizer, indices: torch.Tensor, losses: torch.Tensor | None = None,
             margins: torch.Tensor | None = None) -> int: ...

    def checkpoint(self, epoch: int | None = None) -> Any: ...


@dataclass
class Draws:
    """Which rows a session's passes draw, with which weights (the retrain's question).

    keep: (N,) bool, the rows fresh draws take (None: all); weights: (N,) the loss weight of each
    row (None: 1); recorded: the run's record, whose batches an order-keeping session hands out
    in their order instead of drawing (removed rows keep their slots, weighted 0).
    """

    keep: np.ndarray | None = None
    weights: torch.Tensor | None = None
    recorded: TrainingRecord | None = None


class TrainingSession:
    """What a training function receives (see the module docstring): the model, the data, its options and its draws."""

    def __init__(self, *, model: nn.Module, train_set: Dataset, test_set: Dataset | None, seed: int,
                 options: Mapping[str, Any] | None = None,
                 task: Task | None = None, recipe: Recipe | None = None, draws: Draws | None = None, sink: Sink | None = None,
                 device: torch.device | str = "cpu", progress: ProgressFn = no_progress, total_steps: int = 0):
        self.model, self.train_set, self.test_set, self.seed = model, train_set, test_set, int(seed)
        self.options: dict[str, Any] = dict(options or {})
        """What the function was given (`tdx record ... --set key=value`): the same in every retrain."""
        self.task = task or Task()
        """The training loss (task.train_loss) every retrain minimises and replay differentiates."""
        self.recipe = recipe
        """tdx's own recipe (for tdx's trainer; None for a user's function)."""
        self.device = torch.device(device)
        self.draws = draws or Draws()
        self.total_steps = total_steps
        """Steps the function is expected to take (for progress; 0: unknown). A function may set it."""
        self._sink, self._progress = sink, progress
        n_train = len(train_set)
        self._keep = np.ones(n_train, dtype=bool) if self.draws.keep is None else np.asarray(self.draws.keep, dtype=bool)
        self._weights = torch.ones(n_train) if self.draws.weights is None else torch.as_tensor(self.draws.weights, dtype=torch.float32)
        if self._keep.shape != (n_train,) or self._weights.shape != (n_train,):
            raise SettingsError(f"keep and weights must have one entry per training example ({n_train},), "
                                f"got {self._keep.shape} and {tuple(self._weights.shape)}")
        self._order = torch.Generator().manual_seed(self.seed)  # the data order, one generator for the whole run
        self._yielded = self._steps = 0
        self._open: Batch | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.optimizer_starts: list[int] = []
        """Steps where a new optimizer object took its first step (its state starts from zero there)."""
        self.augment_log: list[tuple[int, str | None]] = []
        """(first step, augmentation import path or None) wherever the pass's augmentation changed."""
        self.not_replayable: list[str] = []
        """What the function did that replay cannot do again (inputs of its own, parameter groups with their own settings)."""

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._steps

    @property
    def order_keeping(self) -> bool:
        """Whether this session hands out the run's recorded batches (an order-keeping retrain) instead of drawing them."""
        return self.draws.recorded is not None

    def _candidates(self, rows: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """The rows a pass takes (a bool mask or indices; None: every row), less those removed from fresh draws."""
        n_train = len(self.train_set)
        if rows is None:
            chosen = np.arange(n_train)
        else:
            given = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
            chosen = np.flatnonzero(given) if given.dtype == bool else given.astype(np.int64).reshape(-1)
            if len(chosen) and (chosen.min() < 0 or chosen.max() >= n_train):
                raise SettingsError(f"session.batches: rows must lie in 0..{n_train - 1} (the training set's rows)")
        if not self.order_keeping:
            chosen = chosen[self._keep[chosen]]
        return torch.from_numpy(np.ascontiguousarray(chosen))

    def n_batches(self, batch_size: int, *, rows: torch.Tensor | np.ndarray | None = None, drop_last: bool = False) -> int:
        """How many batches a pass of session.batches with these arguments hands out (a learning-rate schedule may need it)."""
        if batch_size < 1:
            raise SettingsError(f"session.batches: batch_size must be at least 1, got {batch_size}")
        count = len(self._candidates(rows))
        return count // batch_size if drop_last else math.ceil(count / batch_size)

    def batches(self, batch_size: int, *, rows: torch.Tensor | np.ndarray | None = None, augment: Augment | None = None,
                shuffle: bool = True, drop_last: bool = False, inputs: torch.Tensor | None = None) -> Iterator[Batch]:
        """One pass: the batches of `rows` (default: the training set) in the session's order, each with its step's randomness.

        augment: a top-level function augment(x, generator) drawing only from the generator, a CPU
        generator (draw on the CPU, then move to x.device), so that replay draws it again. inputs:
        (N, ...) the tensor the rows index (default: the training set's x; replay rebuilds only the
        recipe's stage views). While a batch is in hand, the global torch RNG is seeded for its step
        (dropout); it is restored after the pass.
        """
        count = self.n_batches(batch_size, rows=rows, drop_last=drop_last)
        candidates = self._candidates(rows)
        order = torch.randperm(len(candidates), generator=self._order) if shuffle else torch.arange(len(candidates))
        source = self.train_set.x if inputs is None else inputs
        if inputs is not None and self.recipe is None:  # replay rebuilds the recipe's stage views, not a tensor of the loop's own
            self._not_replayable("a pass drew its inputs from a tensor of its own (session.batches(inputs=...))")
        path = None if augment is None else import_path(augment, "augment")
        if not self.augment_log or self.augment_log[-1][1] != path:
            self.augment_log.append((self._yielded + 1, path))
        for number in range(count):
            step, drawn = self._yielded + 1, order[number * batch_size : (number + 1) * batch_size]
            rows_now = self._recorded_rows(step, len(drawn)) if self.order_keeping else candidates[drawn]
            with seeded_global_rng(step_seed(self.seed, step, "dropout")):
                x = source[rows_now].to(self.device)
                if augment is not None:  # a CPU generator wherever x is: the same draws on every device
                    x = augment(x, torch.Generator().manual_seed(step_seed(self.seed, step, "augment")))
                self._open = Batch(rows_now, x, self.train_set.y[rows_now].to(self.device), step, number, count,
                                   self._weights[rows_now].to(self.device))
                self._yielded = step
                yield self._open

    def _recorded_rows(self, step: int, expected: int) -> torch.Tensor:
        """Step `step`'s recorded batch, checked to be the size this pass draws (else the loop draws differently than recorded)."""
        record = self.draws.recorded
        if step > record.n_steps:
            raise SettingsError(f"the training function takes more steps than its run recorded ({record.n_steps}): it draws "
                                "differently than when it was recorded (options, data or code changed?)")
        rows = torch.from_numpy(record.batch(step).astype(np.int64))
        if len(rows) != expected:
            raise SettingsError(f"step {step}: the training function draws a batch of {expected} where its run recorded {len(rows)}: "
                                "it draws differently than when it was recorded (options, data or code changed?)")
        return rows

    def step(self, optimizer: torch.optim.Optimizer, batch: Batch, losses: torch.Tensor | None = None,
             margins: torch.Tensor | None = None) -> int:
        """Note one optimizer step on `batch` (call it right after optimizer.step()); returns the step number."""
        if batch is not self._open:
            raise SettingsError("session.step: pass the batch session.batches just handed out, once per optimizer step")
        if not batch.weighed and bool((batch._weights != 1).any()):
            raise SettingsError("the training function ignores the session's example weights: this retrain removes examples "
                                "but its loss counts them; compute the loss with batch.loss(losses) (or multiply by batch.weights)")
        self._open = None
        if optimizer is not self._optimizer:
            self.optimizer_starts.append(batch.step)
            self._optimizer = optimizer  # held, so that a new optimizer never reuses this one's id
            if _groups_differ(optimizer):
                self._not_replayable("the optimizer's parameter groups have different hyperparameters (the record keeps the first's)")
        if self._sink is not None:
            self._sink.step(optimizer, batch.rows, losses=losses, margins=margins)
        self._steps += 1
        self._progress(self._steps, max(self.total_steps, self._steps))
        return self._steps

    def _not_replayable(self, reason: str) -> None:
        if reason not in self.not_replayable:
            self.not_replayable.append(reason)

    def stage(self, name: str) -> None:
        """Start a named stage (pretrain, finetune, ...); recording keeps the previous stage's end as a checkpoint."""
        if self._sink is not None:
            self._sink.stage(name)

    def checkpoint(self, epoch: int | None = None) -> None:
        """Keep the model's weights now as a checkpoint of the run (a retrain keeps none)."""
        if self._sink is not None:
            self._sink.checkpoint(epoch)

    def finish(self) -> None:
        """Check, once the function returned, that it trained: steps taken, every recorded one when order-keeping."""
        if self._steps == 0:
            raise SettingsError("the training function took no step: call session.step(optimizer, batch) after each optimizer.step()")
        if self.order_keeping and self._steps != self.draws.recorded.n_steps:
            raise SettingsError(f"the training function took {self._steps} steps where its run recorded {self.draws.recorded.n_steps}: "
                                "it draws differently than when it was recorded (options, data or code changed?)")


def _groups_differ(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's parameter groups differ in anything but their parameters (per-group lr, decay, momentum)."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return any(other != settings[0] for other in settings[1:])


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """The global torch RNG (CPU and the current CUDA device) seeded inside the block, the caller's state restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def call_function(function: TrainingFunction, session: TrainingSession) -> nn.Module:
    """Run a training function on its session and check it trained; the trained model (session.model), in eval mode.

    Small models train on one thread (threads.py); the global RNG starts from the session's seed,
    so what the function draws outside the session is still the same for the same seed.
    """
    initial = [parameter.detach().clone() for parameter in session.model.parameters()]
    with one_thread(is_small(session.model)), seeded_global_rng(step_seed(session.seed, 0, "function")):
        try:
            function(session)
        except TdxError:
            raise
        except Exception as exc:  # the loop's own bug: one line for the page, the traceback where the output goes (a job's log)
            traceback.print_exc()
            name = getattr(function, "__qualname__", repr(function))
            raise TrainingFunctionError(f"the training function {name} raised {type(exc).__name__}: {exc} "
                                        "(its traceback is in the output, a job's log)") from exc
    session.finish()
    if all(torch.equal(before, after.detach()) for before, after in zip(initial, session.model.parameters())):
        raise SettingsError("the training function took steps but session.model's weights did not change: train session.model "
                            "(load your initial weights into it rather than building another model)")
    return session.model.eval()
