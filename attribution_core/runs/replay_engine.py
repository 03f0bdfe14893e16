"""Replaying a recorded training run exactly, and differentiating through it (MAGIC-style metagradients).

Every training example carries a weight w_i (1 in the real run) in its batch's loss,
Σ_{i ∈ B_t} w_i ℓ_i / |B_t| (the batch's size as trained). Training is then a differentiable map
w -> θ_T: the optimizer steps of the record (its batches in their order, each stage's view of the
inputs, each step's augmentation and dropout drawn again from the session's per-step seeds
(session.py), the learning rates, SGD with momentum (Nesterov too) and weight decay, Adam and
AdamW, a fresh optimizer state wherever the run started one), from the run's initial weights.
`replay_forward` runs that map (w = 0 for an example removed is the order-keeping retrain of the
LDS ground truth, to float rounding); `metagradients` carries a block of query adjoints backward
through every step, one batched Hessian-vector product per step, and returns d f_q(θ_T) / d w_i
for every query and example.

BatchNorm: in training a batch normalises by its own statistics (a weight-0 example keeps its
slot and counts in them, as in the order-keeping retrain), and the running statistics are
updated from them; the final model is measured in eval mode, with those running statistics. So
the running statistics are part of the replayed state, updated by the same rule as torch
((1 − m) · running + m · batch statistic, unbiased variance), and differentiated through like the
weights: a step's batch statistics depend on its parameters, and the measurement on the final
running statistics.

Memory: states (weights, buffers and optimizer moments) are kept every `stride` steps (about
√T); the steps between two kept states are recomputed from the earlier one, with their autograd
graphs, before they are walked back one segment at a time, so memory grows as √T × parameters.
Replay's fit stores the kept states (`ReplayedStates`): a block of queries then costs one reverse
pass (each step taken again with its graph, then walked back: two to three training runs for one
query, shared by a block). The replayed weights are checked against every stored checkpoint on
the way (to about 1e-5 relative in float32), with an error naming the first step where the run
does not replay: randomness drawn outside the session, parameter groups with their own
hyperparameters, gradient clipping or nondeterministic kernels are what make a run not replay.

The derivative is exact where w -> θ_T is smooth. With ReLUs it is only piecewise smooth (a
pre-activation crossing 0 makes a step's gradient jump), and a run can amplify those jumps: on
the demo's fmnist-two-stage (pretraining at lr 0.05 on noisy pixels) float32 and float64 replays
end 3 % apart, and moving the weights of 5 % of the examples from 1 to 0.95 changes the test
margins by 0.25 rms, 16 times the first-order prediction and half the effect of removing them
(benchmarks/RESULTS.md, B7: rounding sensitivity).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..errors import DataError, SettingsError
from ..models import build_model
from ..progress import ProgressFn, no_progress
from ..store import load_tensors
from ..task import Task
from .recorder import INITIAL_WEIGHTS
from .run import Run
from .session import Augment, seeded_global_rng, step_seed
from .threads import is_small, one_thread
from .training import load_function

Params = dict[str, torch.Tensor]
OptimizerState = dict[str, torch.Tensor]
REPLAYABLE_OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class State:
    """Where training stands between two steps: parameters, buffers (running statistics) and the optimizer's moments."""

    params: Params
    buffers: Params
    optimizer: OptimizerState

    def detached(self) -> State:
        """The same values, cut from any autograd graph."""
        return State(*({key: value.detach() for key, value in part.items()} for part in (self.params, self.buffers, self.optimizer)))


@dataclass
class Step:
    """One recorded optimizer step: its number, stage, hyperparameters, batch rows, and how its inputs were drawn."""

    number: int
    stage: int
    optimizer: str
    lr: float
    momentum: float
    beta2: float
    weight_decay: float
    nesterov: bool
    rows: torch.Tensor
    fresh: bool = False
    """A new optimizer took its first step here: its moments start from zero."""
    augment: Augment | None = None


@dataclass
class ReplayPlan:
    """What replaying a run needs: the architecture, the initial state, the steps, each stage's inputs and the checkpoints.

    initial: weights and buffers before `first_step` (the run's initial weights, or the checkpoint
    that ends the stage before a window); steps: every recorded step from first_step on; views: per
    stage, the training inputs (N, ...) as it saw them; checkpoints: step -> stored weights, to
    verify; seed: the run's seed, from which each step's augmentation and dropout are drawn.
    """

    model: nn.Module
    initial: Params
    initial_buffers: Params
    first_step: int
    steps: list[Step]
    views: dict[int, torch.Tensor]
    train_y: torch.Tensor
    checkpoints: dict[int, Params]
    task: Task
    seed: int = 0

    @property
    def n_steps(self) -> int:
        """How many steps are replayed."""
        return len(self.steps)

    def measure(self, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The task's measurement (B,) of examples x, y under these weights, the model in eval mode (running statistics).

        Differentiable in the running statistics too (torch's batch-norm kernel is not: see _normalised_by).
        """
        self.model.eval()
        state = {**params, **{name: value.detach() for name, value in buffers.items()}}
        with _normalised_by(self.model, buffers):
            return self.task.measurement(lambda inputs: functional_call(self.model, state, (inputs,)), x, y)


def why_not_replayable(run: Run) -> str | None:
    """Why a run cannot be replayed exactly, or None when it can."""
    if run.record is None:
        return "the run has no per-step training record (train it with tdx)"
    trained_by = run.training_function()
    if trained_by is None:
        return (f"the run was {run.origin} from a plain loop, which replay cannot run again: write the loop as a training function "
                "and record it with `tdx record` (README: Your own model)")
    if trained_by.not_replayable:
        return "; ".join(trained_by.not_replayable)
    others = sorted(set(run.record.optimizer) - set(REPLAYABLE_OPTIMIZERS))
    if others:
        return f"its optimizer ({', '.join(others)}) is not one replay knows (SGD with momentum, Adam, AdamW)"
    return None


def replay_plan(run: Run, *, start_stage: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                task: Task | None = None) -> ReplayPlan:
    """The plan to replay a run from its start, or from the beginning of `start_stage` (earlier steps held fixed)."""
    reason = why_not_replayable(run)
    if reason is not None:
        raise SettingsError(f"run {run.run_id!r} cannot be replayed: {reason}")
    if not 0 <= start_stage < len(run.recipe.stages):
        raise SettingsError(f"start_stage={start_stage}: run {run.run_id!r} has stages 0..{len(run.recipe.stages) - 1}")
    run.require_trusted()
    record, trained_by, (train_set, _) = run.record, run.training_function(), run.datasets()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # a run older than initial.safetensors: the trainer's initialisation from its seed
        torch.manual_seed(run.recipe.seed)
        model = build_model(run.model, train_set.input_shape, train_set.n_classes)
    initial_file = run.directory / INITIAL_WEIGHTS
    if initial_file.is_file():
        model.load_state_dict(load_tensors(initial_file))
    model = model.to(device=device, dtype=dtype).train()
    first_step = 1 + int((record.stage < start_stage).sum())
    starts = set(trained_by.optimizer_starts) or {1 + int((record.stage < stage).sum()) for stage in range(len(run.recipe.stages))}
    if first_step not in starts:
        raise SettingsError(f"start_stage={start_stage}: the run's optimizer carries its state into stage {start_stage}, so a "
                            "window from there cannot start from zero moments; replay the whole run (start_stage=0)")
    if start_stage > 0:  # the end of every stage is a kept checkpoint
        model = run.load_model(next(info for info in run.checkpoints if info.step == first_step - 1).index).to(device=device, dtype=dtype)
    initial = _floating(dict(model.named_parameters()), dtype)
    initial_buffers = _floating(dict(model.named_buffers()), dtype)
    augments = {path: load_function(path) for _, path in trained_by.augment if path is not None}
    steps = [Step(t, int(record.stage[t - 1]), record.optimizer[t - 1], float(record.lr[t - 1]), float(record.momentum[t - 1]),
                  float(record.beta2[t - 1]), float(record.weight_decay[t - 1]), bool(record.nesterov[t - 1]),
                  torch.as_tensor(record.batch(t), device=device), fresh=t in starts,
                  augment=augments.get(trained_by.augment_at(t)))
             for t in range(first_step, record.n_steps + 1)]
    views = {stage: run.train_view(stage).to(device=device, dtype=dtype) for stage in sorted({step.stage for step in steps})}
    checkpoints = {info.step: _floating(run.load_model(info.index).state_dict(), dtype, device)
                   for info in run.checkpoints if info.step >= first_step}
    return ReplayPlan(model.train(), initial, initial_buffers, first_step, steps, views, train_set.y.to(device), checkpoints,
                      task or Task(), run.recipe.seed)


def _floating(tensors: Params, dtype: torch.dtype, device: torch.device | None = None) -> Params:
    """Detached copies, floating-point ones in the plan's dtype (integer buffers such as a batch count keep theirs)."""
    return {name: value.detach().to(device=device or value.device, dtype=dtype if value.is_floating_point() else value.dtype).clone()
            for name, value in tensors.items()}


def _fresh_optimizer(params: Params, optimizer: str) -> OptimizerState:
    """Optimizer state before a new optimizer's first step: zero moments (Adam's second one too), no steps taken."""
    device = next(iter(params.values())).device
    moments = ("m", "v") if optimizer in ("adam", "adamw") else ("m",)
    # The step count in float64: Adam's bias corrections β^t are taken in double precision, as torch.optim computes them.
    return {f"{moment}.{name}": torch.zeros_like(value) for moment in moments for name, value in params.items()} | {
        "t": torch.zeros((), dtype=torch.float64, device=device)}


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """√values with a zero (not infinite) derivative at 0, where Adam's moments are 0 too."""
    positive = values > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, values, torch.ones_like(values))), torch.zeros_like(values))


@contextmanager
def _running_statistics(model: nn.Module, buffers: Params) -> Iterator[Params]:
    """Inside the block, every BatchNorm forward in training mode writes its new running statistics into the yielded dict.

    Computed from the layer's input and the given (old) buffers by torch's rule, differentiably:
    (1 − m) · old + m · batch mean / unbiased batch variance, m the momentum (or 1 / batches seen
    for a cumulative average); the batch count goes up by one.
    """
    updates: Params = {}
    hooks = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            names = {key: f"{prefix}.{key}" if prefix else key for key in ("running_mean", "running_var", "num_batches_tracked")}

            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, names: dict[str, str] = names) -> None:
                if not module.training:
                    return
                x = inputs[0]
                dims = [dim for dim in range(x.dim()) if dim != 1]
                count = buffers[names["num_batches_tracked"]] + 1
                factor = module.momentum if module.momentum is not None else 1.0 / count.to(x.dtype)
                updates[names["running_mean"]] = (1 - factor) * buffers[names["running_mean"]] + factor * x.mean(dims)
                updates[names["running_var"]] = (1 - factor) * buffers[names["running_var"]] + factor * x.var(dims, correction=1)
                updates[names["num_batches_tracked"]] = count

            hooks.append(module.register_forward_hook(hook))
    try:
        yield updates
    finally:
        for handle in hooks:
            handle.remove()


@contextmanager
def _normalised_by(model: nn.Module, buffers: Params) -> Iterator[None]:
    """Inside the block, every BatchNorm forward in eval mode normalises by the given running statistics, differentiably.

    torch's batch-norm kernel refuses running statistics that require grad; each layer's output is
    computed again from the same formula, (x − mean) / √(var + eps) · weight + bias, with them.
    """
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, prefix: str) -> torch.Tensor | None:
        if module.training:
            return None
        x = inputs[0]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = buffers[f"{prefix}running_mean"].view(shape), buffers[f"{prefix}running_var"].view(shape)
        normalised = (x - mean) / torch.sqrt(var + module.eps)
        return normalised * module.weight.view(shape) + module.bias.view(shape) if module.affine else normalised

    handles = [module.register_forward_hook(
                   lambda module, inputs, output, prefix=f"{name}." if name else "": hook(module, inputs, output, prefix))
               for name, module in model.named_modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StepFunction:
    """One optimizer step as torch.optim takes it: the batch's weighted loss gradient, then the optimizer's update.

    Plain autograd on leaf tensors (not torch.func transforms): on the small models replay is for,
    a step's cost is mostly per-operation overhead, and the functional transforms tripled it.
    """

    def __init__(self, plan: ReplayPlan):
        self.plan = plan

    def inputs(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch (x, y) as it trained: its stage's view of the rows, augmented by the step's generator."""
        x = self.plan.views[step.stage][step.rows]
        if step.augment is not None:  # the session's augmentation generator: a CPU generator seeded for (seed, step)
            x = step.augment(x, torch.Generator().manual_seed(step_seed(self.plan.seed, step.number, "augment")))
        return x, self.plan.train_y[step.rows]

    def gradients(self, step: Step, params: Params, buffers: Params, weights: torch.Tensor, *,
                  create_graph: bool = False) -> tuple[Params, Params]:
        """(∇_θ Σ_{i∈B} w_i ℓ_i / |B| at params, the buffers after the step); with create_graph, both differentiable in the leaves."""
        plan = self.plan
        leaves = params if create_graph else {name: value.detach().requires_grad_() for name, value in params.items()}
        with torch.enable_grad(), seeded_global_rng(step_seed(plan.seed, step.number, "dropout")):
            x, y = self.inputs(step)
            plan.model.train()
            with _running_statistics(plan.model, buffers) as updated:
                # torch also updates the buffers it is given in place: hand it copies, the differentiable update is `updated`
                state = {**leaves, **{name: value.detach().clone() for name, value in buffers.items()}}
                losses = plan.task.train_loss(lambda inputs: functional_call(plan.model, state, (inputs,)), x, y)
            loss = (weights * losses).sum() / len(y)  # the batch's size as trained: a removed example keeps its slot
            gradients = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)))
        new_buffers = buffers | updated
        return gradients, (new_buffers if create_graph else {name: value.detach() for name, value in new_buffers.items()})

    @staticmethod
    def update(step: Step, params: Params, state: OptimizerState, gradients: Params) -> tuple[Params, OptimizerState]:
        """The parameters and optimizer state after the step, from the batch's loss gradients.

        The same tensor operations as torch.optim's single-tensor (CPU) implementations, in the same
        order: `add(..., alpha=)` and `addcdiv` round once where a written-out `a + α·b` rounds twice,
        and a training run can grow one rounding difference per step into percent-sized ones (the
        BatchNorm CNN of B8 does); so replay takes every step bit for bit as the run took it.
        """
        if step.optimizer == "adamw":  # torch.optim.AdamW decays the weights themselves, before the update
            params = {name: value.mul(1 - step.lr * step.weight_decay) for name, value in params.items()}
        elif step.weight_decay:  # torch.optim.SGD and Adam add the decay to the gradient
            gradients = {name: g.add(params[name], alpha=step.weight_decay) for name, g in gradients.items()}
        if step.optimizer == "sgd":  # torch.optim.SGD, dampening 0: buf = μ buf + g (buf = g on the first step)
            moments = {name: state[f"m.{name}"].mul(step.momentum).add(g) for name, g in gradients.items()}
            directions = {name: gradients[name].add(moments[name], alpha=step.momentum) for name in params} if step.nesterov else moments
            new_params = {name: params[name].add(directions[name], alpha=-step.lr) for name in params}
            return new_params, state | {f"m.{name}": value for name, value in moments.items()} | {"t": state["t"] + 1}
        t = state["t"] + 1  # torch.optim.Adam / AdamW (no amsgrad): bias corrections in Python floats, as torch takes them
        count = float(t)
        first = {name: torch.lerp(state[f"m.{name}"], g, 1 - step.momentum) for name, g in gradients.items()}
        second = {name: torch.addcmul(state[f"v.{name}"].mul(step.beta2), g, g, value=1 - step.beta2) for name, g in gradients.items()}
        step_size = step.lr / (1 - step.momentum**count)
        root_correction = math.sqrt(1 - step.beta2**count)
        new_params = {name: params[name].addcdiv(first[name], (_safe_sqrt(second[name]) / root_correction).add(ADAM_EPS), value=-step_size)
                      for name in params}
        return new_params, ({f"m.{name}": value for name, value in first.items()} | {f"v.{name}": value for name, value in second.items()}
                            | {"t": t})

    def __call__(self, step: Step, state: State, weights: torch.Tensor) -> State:
        """The state after `step`, its batch's examples weighted by `weights` (|B|,); no graph kept."""
        gradients, buffers = self.gradients(step, state.params, state.buffers, weights)
        with torch.no_grad():
            params, optimizer = self.update(step, state.params, state.optimizer, gradients)
        return State(params, buffers, optimizer)

    def traced(self, step: Step, state: State, weights: torch.Tensor) -> TracedStep:
        """The step taken with its autograd graph kept (leaves: params, moments, float buffers, batch weights), to be walked back once."""
        leaves = {name: value.detach().requires_grad_() for name, value in state.params.items()}
        moments = {key: value.detach().requires_grad_() for key, value in state.optimizer.items() if key != "t"}
        buffers = {name: value.detach().requires_grad_() if value.is_floating_point() else value for name, value in state.buffers.items()}
        batch_weights = weights.detach().requires_grad_()
        with torch.enable_grad():
            gradients, new_buffers = self.gradients(step, leaves, buffers, batch_weights, create_graph=True)
            new_params, new_optimizer = self.update(step, leaves, moments | {"t": state.optimizer["t"]}, gradients)
        return TracedStep(State(leaves, buffers, moments), batch_weights, State(new_params, new_buffers, new_optimizer))


@dataclass
class TracedStep:
    """One step with its graph: leaves (before: params, float buffers, moments; batch weights) -> the state after the step."""

    before: State
    weights: torch.Tensor
    after: State

    def detached_after(self) -> State:
        """The state after the step, detached."""
        return self.after.detached()

    def pull_back(self, adjoint: State, into_optimizer: bool, batched: bool = True) -> tuple[State, torch.Tensor]:
        """(the adjoint before the step, the adjoint of the batch weights (Q, |B|)) from the adjoint (Q, ...) after it.

        into_optimizer False: nothing flows back into the optimizer state after the step (a new
        optimizer starts at the next step, or it is the last step). batched: one reverse pass
        through the step's gradient for all Q adjoints together (vmap); else one per query, which
        is faster where vmap has no batching rule (see vmap_friendly) and for a single query.
        """
        buffer_keys = [key for key, value in self.before.buffers.items() if value.is_floating_point()]
        moment_keys = list(self.before.optimizer) if into_optimizer else []
        outputs = [*self.after.params.values(), *(self.after.buffers[key] for key in buffer_keys),
                   *(self.after.optimizer[key] for key in moment_keys)]
        cotangents = [*adjoint.params.values(), *(adjoint.buffers[key] for key in buffer_keys),
                      *(adjoint.optimizer[key] for key in moment_keys)]
        inputs = [*self.before.params.values(), *(self.before.buffers[key] for key in buffer_keys),
                  *self.before.optimizer.values(), self.weights]
        n_queries = len(cotangents[0])
        if n_queries == 1 or not batched:
            per_query = [torch.autograd.grad(outputs, inputs, [c[query] for c in cotangents], allow_unused=True,
                                             retain_graph=query < n_queries - 1)
                         for query in range(n_queries)]
            grads = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_query)]
        else:
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True, is_grads_batched=True)
        # An input the outputs do not reach (a parameter the loss does not use) has a zero adjoint.
        grads = [torch.zeros((n_queries, *leaf.shape), dtype=leaf.dtype, device=leaf.device) if g is None else g.detach()
                 for g, leaf in zip(grads, inputs)]
        n_params, n_buffers = len(self.before.params), len(buffer_keys)
        params = dict(zip(self.before.params, grads[:n_params]))
        buffers = dict(zip(buffer_keys, grads[n_params : n_params + n_buffers]))
        optimizer = dict(zip(self.before.optimizer, grads[n_params + n_buffers : -1]))
        return State(params, buffers, optimizer), grads[-1]


@dataclass
class ReplayedStates:
    """The run replayed once at some example weights: the final state and the states kept before every `stride`-th step.

    kept: step index (from the plan's start) -> the state before that step. What a reverse pass
    starts from; `metagradients` computes it when not given one (Replay's fit stores it, so a
    block of queries costs the reverse pass only).
    """

    final: State
    kept: dict[int, State]
    stride: int
    weights: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors (for a safetensors file)."""
        tensors = {"weights": self.weights, "stride": torch.tensor(self.stride)}
        for prefix, state in {"final": self.final, **{f"kept.{index}": state for index, state in self.kept.items()}}.items():
            for kind, part in zip("pbs", (state.params, state.buffers, state.optimizer)):
                tensors |= {f"{prefix}.{kind}.{key}": value for key, value in part.items()}
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ReplayedStates:
        """The states back from `to_tensors`' flat names."""
        parts: dict[str, tuple[Params, Params, OptimizerState]] = {}
        for name, value in tensors.items():
            if name.startswith(("final.", "kept.")):
                prefix, kind, key = (name.split(".", 2) if name.startswith("final.") else
                                     (lambda pieces: (".".join(pieces[:2]), pieces[2], pieces[3]))(name.split(".", 3)))
                parts.setdefault(prefix, ({}, {}, {}))["pbs".index(kind)][key] = value
        kept = {int(prefix.split(".")[1]): State(*part) for prefix, part in parts.items() if prefix != "final"}
        return cls(State(*parts["final"]), kept, int(tensors["stride"]), tensors["weights"])


def replay_forward(plan: ReplayPlan, weights: torch.Tensor | None = None, *, keep_every: int = 0, verify: bool = True,
                   tolerance: float = 1e-5, progress: ProgressFn = no_progress) -> tuple[Params, dict[int, State]]:
    """(the final weights and buffers as one state dict, kept states) of the run replayed with example weights (N,) (None: all 1).

    keep_every > 0 keeps the state before every keep_every-th step (by step index from the plan's
    start), for `metagradients`. With verify, the weights after every stored checkpoint's step must
    match it (relative error ≤ tolerance), else a DataError names the step. progress(done, total)
    after every step: a callback that raises stops the replay there.
    """
    final, kept = _replay(plan, _example_weights(plan, weights), keep_every, verify, tolerance, progress)
    return {**final.params, **final.buffers}, kept


def _replay(plan: ReplayPlan, weights: torch.Tensor, keep_every: int, verify: bool, tolerance: float,
            progress: ProgressFn) -> tuple[State, dict[int, State]]:
    step_function = StepFunction(plan)
    state, kept = State(dict(plan.initial), dict(plan.initial_buffers), {}), {}
    with torch.no_grad(), one_thread(is_small(plan.model)):  # as the trainer: small models step faster on one thread
        for index, step in enumerate(plan.steps):
            if step.fresh:  # a new optimizer's first step (tdx's trainer builds one for every stage)
                state = State(state.params, state.buffers, _fresh_optimizer(state.params, step.optimizer))
            if keep_every and index % keep_every == 0:
                kept[index] = state
            state = step_function(step, state, weights[step.rows])
            if verify and step.number in plan.checkpoints:
                _verify({**state.params, **state.buffers}, plan.checkpoints[step.number], step.number, tolerance)
            progress(index + 1, plan.n_steps)
    return state, kept


def _example_weights(plan: ReplayPlan, weights: torch.Tensor | float | None) -> torch.Tensor:
    """Example weights (N,) in the plan's dtype and device: None is 1 for every example, a number that weight for every example."""
    dtype, device = next(iter(plan.initial.values())).dtype, plan.train_y.device
    if weights is None or isinstance(weights, (int, float)):
        return torch.full((len(plan.train_y),), 1.0 if weights is None else float(weights), dtype=dtype, device=device)
    return weights.to(device=device, dtype=dtype)


def replayed_states(plan: ReplayPlan, weights: torch.Tensor | float | None = None, *, stride: int | None = None, verify: bool = True,
                    progress: ProgressFn = no_progress) -> ReplayedStates:
    """The run replayed once at example weights (N,) (a number: every example's weight; None: 1), keeping every stride-th state."""
    stride = stride or default_stride(plan.n_steps)
    weights = _example_weights(plan, weights)
    final, kept = _replay(plan, weights, stride, verify, 1e-5, progress)
    return ReplayedStates(final, kept, stride, weights)


def relative_difference(params: Params, stored: Params) -> float:
    """The largest relative (Frobenius) difference between two sets of weights, over the floating-point tensors of `stored`."""
    return max((params[name] - stored[name]).norm().item() / max(stored[name].norm().item(), 1e-12)
               for name in stored if stored[name].is_floating_point())


def _verify(state: Params, stored: Params, step: int, tolerance: float) -> None:
    """Raise DataError unless the replayed weights (and running statistics) after `step` match the stored checkpoint."""
    error = relative_difference(state, stored)
    if not error <= tolerance:
        raise DataError(
            f"the run does not replay: after step {step} the replayed weights differ from the stored checkpoint by {error:.2e} "
            f"(relative, more than {tolerance:g}); randomness drawn outside the training session, parameter groups with their own "
            "learning rate or weight decay, gradient clipping, nondeterministic kernels or a changed data source can cause this"
        )


def default_stride(n_steps: int) -> int:
    """Steps between kept states: about √T, so memory and recomputation balance."""
    return max(1, math.isqrt(max(1, n_steps)))


def metagradients(plan: ReplayPlan, query_x: torch.Tensor, query_y: torch.Tensor, *, at_weight: float = 1.0, stride: int | None = None,
                  verify: bool = True, states: ReplayedStates | None = None, progress: ProgressFn = no_progress) -> torch.Tensor:
    """d f_q(θ_T) / d w_i (n_queries, n_train): each query's measurement after training, by each example's weight, at w = at_weight.

    Reverse mode through every step of the plan, the queries carried backward together as a
    block of adjoints (one reverse pass through each step's gradient per step). `states` (from
    `replayed_states` at these weights) skips the forward replay; otherwise it is computed first
    (verified against the checkpoints when verify and at_weight is 1). progress(done, total)
    after every replayed step, forward and backward: a callback that raises stops the work there.
    """
    forward_steps = 0 if states is not None else plan.n_steps
    total = forward_steps + plan.n_steps
    if states is None:
        states = replayed_states(plan, at_weight, stride=stride, verify=verify and at_weight == 1,
                                 progress=lambda done, _: progress(done, total))
    dtype = states.weights.dtype
    query_x = query_x.to(device=plan.train_y.device, dtype=dtype)
    query_y = query_y.to(plan.train_y.device)
    params = {name: value.detach().requires_grad_() for name, value in states.final.params.items()}
    buffers = {name: value.detach().requires_grad_() if value.is_floating_point() else value
               for name, value in states.final.buffers.items()}
    differentiable = {**params, **{name: value for name, value in buffers.items() if value.is_floating_point()}}
    with torch.enable_grad():
        measurements = plan.measure(params, buffers, query_x, query_y)
        eye = torch.eye(len(query_y), dtype=dtype, device=query_x.device)
        grads = dict(zip(differentiable, torch.autograd.grad(measurements, list(differentiable.values()), eye, is_grads_batched=True,
                                                             allow_unused=True)))
    grads = {name: torch.zeros((len(query_y), *value.shape), dtype=value.dtype, device=value.device) if grads[name] is None else grads[name]
             for name, value in differentiable.items()}
    adjoint = State({name: grads[name] for name in params}, {name: grads[name] for name in differentiable if name not in params}, {})
    result = torch.zeros(len(query_y), len(plan.train_y), dtype=dtype, device=query_x.device)
    with one_thread(is_small(plan.model)):
        _walk_back(plan, states, adjoint, result, lambda done: progress(forward_steps + done, total))
    return result


def vmap_friendly(model: nn.Module) -> bool:
    """Whether a step's reverse pass is faster batched over queries (vmap) than one query at a time.

    The legacy vmap behind autograd's is_grads_batched has no batching rule for the double
    backward of convolutions and batch norm and loops internally, slower than a plain loop
    (the example's BatchNorm CNN: 21 s batched against 13 s looped for 32 queries); for linear
    layers it batches, and was the faster on the MLPs.
    """
    return not any(isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) for module in model.modules())


def _walk_back(plan: ReplayPlan, states: ReplayedStates, adjoint: State, result: torch.Tensor, progress: Callable[[int], None]) -> None:
    """Carry the adjoint back from the end to the plan's first step, adding each batch's weight derivatives to result (Q, N).

    Segment by segment from the last: the segment's steps are recomputed from its kept state
    with their graphs, then walked back one by one (memory: one segment's graphs).
    """
    step_function, into_optimizer, done, batched = StepFunction(plan), False, 0, vmap_friendly(plan.model)
    for start in sorted(states.kept, reverse=True):
        stop = min(start + states.stride, plan.n_steps)
        traced = _recompute(plan, step_function, states.kept[start], start, stop, states.weights)
        for index in reversed(range(start, stop)):
            step = plan.steps[index]
            adjoint, adjoint_weights = traced.pop().pull_back(adjoint, into_optimizer, batched)
            result.index_add_(1, step.rows, adjoint_weights)
            into_optimizer = not step.fresh  # a new optimizer's state was created from zero: nothing flows back through it
            done += 1
            progress(done)


def _recompute(plan: ReplayPlan, step_function: StepFunction, kept: State, start: int, stop: int,
               weights: torch.Tensor) -> list[TracedStep]:
    """Steps start..stop-1 recomputed from the kept state before step `start`, each with its graph."""
    state, traced = kept, []
    for index in range(start, stop):
        step = plan.steps[index]
        if step.fresh and index != start:
            state = State(state.params, state.buffers, _fresh_optimizer(state.params, step.optimizer))
        traced.append(step_function.traced(step, state, weights[step.rows]))
        state = traced[-1].detached_after()
    return traced
