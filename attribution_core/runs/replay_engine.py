"""Replaying a recorded training run exactly, and differentiating through it (MAGIC-style metagradients).

Every training example carries a weight w_i (1 in the real run) in its batch's loss,
Σ_{i ∈ B_t} w_i ℓ_i / |B_t| (the batch's size as trained). Training is then a differentiable map
w -> θ_T: the optimizer steps of the record (its batches in their order, each stage's view of the
inputs, the learning rates, SGD momentum and weight decay, Adam), from the initial weights that
tdx's trainer drew from the run's seed. `replay_forward` runs that map (w = 0 for an example
removed is the order-keeping retrain of the LDS ground truth); `metagradients` carries a block of
query adjoints backward through every step, one batched Hessian-vector product per step, and
returns d f_q(θ_T) / d w_i for every query and example.

Memory: states (weights and optimizer moments) are kept every `stride` steps (about √T); the
steps between two kept states are recomputed from the earlier one, with their autograd graphs
(about four parameter-sized tensors a step, plus activations), before they are walked back one
segment at a time, so memory grows as √T × parameters. Replay's fit stores the kept states
(`ReplayedStates`): a block of queries then costs one reverse pass (each step taken again with
its graph, then walked back: two to three training runs for one query, shared by a block). The
replayed weights are checked against every stored checkpoint on the way (to about 1e-5 relative
in float32), with an error naming the first step where the run does not replay.

The derivative is exact where w -> θ_T is smooth. With ReLUs it is only piecewise smooth (a
pre-activation crossing 0 makes a step's gradient jump), and a run can amplify those jumps: on
the demo's fmnist-two-stage (pretraining at lr 0.05 on noisy pixels) float32 and float64 replays
end 3 % apart, and moving the weights of 5 % of the examples from 1 to 0.95 changes the test
margins by 0.25 rms, 16 times the first-order prediction and half the effect of removing them
(benchmarks/RESULTS.md, B7: rounding sensitivity).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..errors import DataError, SettingsError
from ..models import build_model
from ..progress import ProgressFn, no_progress
from ..task import Task
from .run import Run
from .training import is_small, one_thread

Params = dict[str, torch.Tensor]
OptimizerState = dict[str, torch.Tensor]
REPLAYABLE_OPTIMIZERS = ("sgd", "adam")
ADAM_EPS = 1e-8


@dataclass
class Step:
    """One recorded optimizer step: its stage, hyperparameters and batch rows."""

    stage: int
    optimizer: str
    lr: float
    momentum: float
    beta2: float
    weight_decay: float
    rows: torch.Tensor


@dataclass
class ReplayPlan:
    """What replaying a run needs: the architecture, the initial weights, the steps, each stage's inputs and the checkpoints.

    initial: weights before `first_step` (the seed's initialisation, or the checkpoint that ends
    the stage before a window); steps: every recorded step from first_step on; views: per stage,
    the training inputs (N, ...) as it saw them; checkpoints: step -> stored weights, to verify.
    """

    model: nn.Module
    initial: Params
    first_step: int
    steps: list[Step]
    views: dict[int, torch.Tensor]
    train_y: torch.Tensor
    checkpoints: dict[int, Params]
    task: Task

    @property
    def n_steps(self) -> int:
        """How many steps are replayed."""
        return len(self.steps)


def why_not_replayable(run: Run) -> str | None:
    """Why a run cannot be replayed exactly, or None when it can."""
    if run.record is None:
        return "the run has no per-step training record (train it with tdx)"
    if run.metrics.get("origin", "trained") != "trained":  # a user's loop: its augmentation and initial weights are not recorded
        return f"the run was {run.metrics['origin']} outside tdx's trainer, whose steps replay knows"
    others = sorted(set(run.record.optimizer) - set(REPLAYABLE_OPTIMIZERS))
    if others:
        return f"its optimizer ({', '.join(others)}) is not one replay knows (SGD with momentum, Adam)"
    train_set, _ = run.datasets()
    model = build_model(run.model, train_set.input_shape, train_set.n_classes)
    if any(True for _ in model.buffers()):
        return "the model has buffers (batch-norm statistics), which replay does not carry yet"
    return None


def replay_plan(run: Run, *, start_stage: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                task: Task | None = None) -> ReplayPlan:
    """The plan to replay a recorded tdx run from its start, or from the beginning of `start_stage` (earlier steps held fixed)."""
    reason = why_not_replayable(run)
    if reason is not None:
        raise SettingsError(f"run {run.run_id!r} cannot be replayed: {reason}")
    if not 0 <= start_stage < len(run.recipe.stages):
        raise SettingsError(f"start_stage={start_stage}: run {run.run_id!r} has stages 0..{len(run.recipe.stages) - 1}")
    record, (train_set, _) = run.record, run.datasets()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # the trainer's initialisation (training.fit_model)
        torch.manual_seed(run.recipe.seed)
        model = build_model(run.model, train_set.input_shape, train_set.n_classes)
    model = model.to(device=device, dtype=dtype).train()
    first_step = 1 + int((record.stage < start_stage).sum())
    if start_stage == 0:
        initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    else:  # the end of every stage is a kept checkpoint, and the optimizer starts afresh with each stage
        previous = next(info for info in run.checkpoints if info.step == first_step - 1)
        initial = _parameters(run.load_model(previous.index), device, dtype)
    steps = [Step(int(record.stage[t - 1]), record.optimizer[t - 1], float(record.lr[t - 1]), float(record.momentum[t - 1]),
                  float(record.beta2[t - 1]), float(record.weight_decay[t - 1]), torch.as_tensor(record.batch(t), device=device))
             for t in range(first_step, record.n_steps + 1)]
    views = {stage: run.train_view(stage).to(device=device, dtype=dtype) for stage in sorted({step.stage for step in steps})}
    checkpoints = {info.step: _parameters(run.load_model(info.index), device, dtype) for info in run.checkpoints if info.step >= first_step}
    return ReplayPlan(model, initial, first_step, steps, views, train_set.y.to(device), checkpoints, task or Task())


def _parameters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Params:
    return {name: parameter.detach().to(device=device, dtype=dtype) for name, parameter in model.named_parameters()}


def _fresh_state(params: Params, optimizer: str) -> OptimizerState:
    """Optimizer state at the start of a stage: zero moments (Adam's second one too), no steps taken."""
    device = next(iter(params.values())).device
    moments = ("m", "v") if optimizer == "adam" else ("m",)
    # The step count in float64: Adam's bias corrections β^t are taken in double precision, as torch.optim computes them.
    return {f"{moment}.{name}": torch.zeros_like(value) for moment in moments for name, value in params.items()} | {
        "t": torch.zeros((), dtype=torch.float64, device=device)}


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """√values with a zero (not infinite) derivative at 0, where Adam's moments are 0 too."""
    positive = values > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, values, torch.ones_like(values))), torch.zeros_like(values))


class StepFunction:
    """One optimizer step as torch.optim takes it: the batch's weighted loss gradient, then the optimizer's update.

    Plain autograd on leaf tensors (not torch.func transforms): on the small models replay is for,
    a step's cost is mostly per-operation overhead, and the functional transforms tripled it.
    """

    def __init__(self, plan: ReplayPlan):
        self.plan = plan

    def gradients(self, step: Step, params: Params, weights: torch.Tensor, *, create_graph: bool = False) -> Params:
        """∇_θ Σ_{i∈B} w_i ℓ_i / |B| at params; with create_graph, differentiable in params and weights (leaves requiring grad)."""
        x, y = self.plan.views[step.stage][step.rows], self.plan.train_y[step.rows]
        leaves = params if create_graph else {name: value.detach().requires_grad_() for name, value in params.items()}
        with torch.enable_grad():
            losses = self.plan.task.train_loss(lambda inputs: functional_call(self.plan.model, leaves, (inputs,)), x, y)
            loss = (weights * losses).sum() / len(y)  # the batch's size as trained: a removed example keeps its slot
            return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)))

    @staticmethod
    def update(step: Step, params: Params, state: OptimizerState, gradients: Params) -> tuple[Params, OptimizerState]:
        """The parameters and optimizer state after the step, from the batch's loss gradients (plain tensor arithmetic)."""
        if step.weight_decay:  # torch.optim adds the decay to the gradient
            gradients = {name: g + step.weight_decay * params[name] for name, g in gradients.items()}
        if step.optimizer == "sgd":  # torch.optim.SGD, dampening 0: buf = μ buf + g (buf = g on the first step), p -= lr buf
            moments = {name: step.momentum * state[f"m.{name}"] + g for name, g in gradients.items()}
            new_params = {name: params[name] - step.lr * moments[name] for name in params}
            return new_params, state | {f"m.{name}": value for name, value in moments.items()} | {"t": state["t"] + 1}
        t = state["t"] + 1  # torch.optim.Adam (no amsgrad): bias-corrected moments
        first = {name: torch.lerp(state[f"m.{name}"], g, 1 - step.momentum) for name, g in gradients.items()}
        second = {name: step.beta2 * state[f"v.{name}"] + (1 - step.beta2) * g * g for name, g in gradients.items()}
        step_size = step.lr / (1 - step.momentum**t)
        root_correction = torch.sqrt(1 - step.beta2**t)
        new_params = {name: params[name] - step_size * first[name] / (_safe_sqrt(second[name]) / root_correction + ADAM_EPS)
                      for name in params}
        return new_params, ({f"m.{name}": value for name, value in first.items()} | {f"v.{name}": value for name, value in second.items()}
                            | {"t": t})

    def __call__(self, step: Step, params: Params, state: OptimizerState, weights: torch.Tensor) -> tuple[Params, OptimizerState]:
        """The parameters and optimizer state after `step`, its batch's examples weighted by `weights` (|B|,); no graph kept."""
        gradients = self.gradients(step, params, weights)
        with torch.no_grad():
            return self.update(step, params, state, gradients)

    def traced(self, step: Step, params: Params, state: OptimizerState, weights: torch.Tensor) -> TracedStep:
        """The step taken with its autograd graph kept (leaves: params, moments, batch weights), to be walked back once."""
        leaves = {name: value.detach().requires_grad_() for name, value in params.items()}
        moments = {key: value.detach().requires_grad_() for key, value in state.items() if key != "t"}
        batch_weights = weights.detach().requires_grad_()
        with torch.enable_grad():
            gradients = self.gradients(step, leaves, batch_weights, create_graph=True)
            new_params, new_state = self.update(step, leaves, moments | {"t": state["t"]}, gradients)
        return TracedStep(leaves, moments, batch_weights, new_params, new_state)


@dataclass
class TracedStep:
    """One step with its graph: leaves (params, moments, batch weights) -> outputs (params, state) after the step."""

    params: Params
    moments: OptimizerState
    weights: torch.Tensor
    new_params: Params
    new_state: OptimizerState

    def after(self) -> tuple[Params, OptimizerState]:
        """The parameters and optimizer state after the step, detached."""
        return ({name: value.detach() for name, value in self.new_params.items()},
                {key: value.detach() for key, value in self.new_state.items()})

    def pull_back(self, adjoint_params: Params, adjoint_state: OptimizerState | None) -> tuple[Params, OptimizerState, torch.Tensor]:
        """(adjoint of params, of moments, of batch weights (Q, |B|)) before the step from the adjoints (Q, ...) after it.

        adjoint_state None: nothing flows back into the state after the step (a fresh stage
        follows, or it is the last step). One reverse pass through the step's gradient, for all
        Q adjoints together (unbatched for one: vmap's overhead is not free on small models).
        """
        outputs = list(self.new_params.values()) + ([self.new_state[key] for key in self.moments] if adjoint_state is not None else [])
        cotangents = list(adjoint_params.values()) + ([adjoint_state[key] for key in self.moments] if adjoint_state is not None else [])
        inputs = [*self.params.values(), *self.moments.values(), self.weights]
        n_queries = len(cotangents[0])
        if n_queries == 1:
            grads = [None if g is None else g.unsqueeze(0)
                     for g in torch.autograd.grad(outputs, inputs, [c[0] for c in cotangents], allow_unused=True)]
        else:
            grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True, is_grads_batched=True)
        # An input the outputs do not reach (a parameter the loss does not use) has a zero adjoint.
        grads = [torch.zeros((n_queries, *leaf.shape), dtype=leaf.dtype, device=leaf.device) if g is None else g
                 for g, leaf in zip(grads, inputs)]
        n_params = len(self.params)
        return (dict(zip(self.params, grads[:n_params])), dict(zip(self.moments, grads[n_params:-1])), grads[-1])


def _starts_stage(plan: ReplayPlan, index: int) -> bool:
    return index == 0 or plan.steps[index].stage != plan.steps[index - 1].stage


@dataclass
class ReplayedStates:
    """The run replayed once at some example weights: the final parameters and the states kept before every `stride`-th step.

    kept: step index (from the plan's start) -> (params, optimizer state) before that step.
    What a reverse pass starts from; `metagradients` computes it when not given one (Replay's fit
    stores it, so a block of queries costs the reverse pass only).
    """

    final: Params
    kept: dict[int, tuple[Params, OptimizerState]]
    stride: int
    weights: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors (for a safetensors file)."""
        tensors = {f"final.{name}": value for name, value in self.final.items()} | {"weights": self.weights, "stride": torch.tensor(self.stride)}
        for index, (params, state) in self.kept.items():
            tensors |= {f"kept.{index}.p.{name}": value for name, value in params.items()}
            tensors |= {f"kept.{index}.s.{key}": value for key, value in state.items()}
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ReplayedStates:
        """The states back from `to_tensors`' flat names."""
        final = {name.removeprefix("final."): value for name, value in tensors.items() if name.startswith("final.")}
        kept: dict[int, tuple[Params, OptimizerState]] = {}
        for name, value in tensors.items():
            if name.startswith("kept."):
                _, index, kind, key = name.split(".", 3)
                kept.setdefault(int(index), ({}, {}))[kind == "s"][key] = value
        return cls(final, kept, int(tensors["stride"]), tensors["weights"])


def replay_forward(plan: ReplayPlan, weights: torch.Tensor | None = None, *, keep_every: int = 0, verify: bool = True,
                   tolerance: float = 1e-5, progress: ProgressFn = no_progress) -> tuple[Params, dict[int, tuple[Params, OptimizerState]]]:
    """(final parameters, kept states) of the run replayed with example weights (N,) (None: all 1).

    keep_every > 0 keeps the state before every keep_every-th step (by step index from the plan's
    start), for `metagradients`. With verify, the weights after every stored checkpoint's step must
    match it (relative error ≤ tolerance), else a DataError names the step. progress(done, total)
    after every step: a callback that raises stops the replay there.
    """
    step_function, params = StepFunction(plan), dict(plan.initial)
    weights = _example_weights(plan, weights)
    state, kept = {}, {}
    with torch.no_grad(), one_thread(is_small(plan.model)):  # as the trainer: small models step faster on one thread
        for index, step in enumerate(plan.steps):
            if _starts_stage(plan, index):  # tdx's trainer builds a new optimizer for every stage
                state = _fresh_state(params, step.optimizer)
            if keep_every and index % keep_every == 0:
                kept[index] = (params, state)
            params, state = step_function(step, params, state, weights[step.rows])
            number = plan.first_step + index
            if verify and number in plan.checkpoints:
                _verify(params, plan.checkpoints[number], number, tolerance)
            progress(index + 1, plan.n_steps)
    return params, kept


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
    final, kept = replay_forward(plan, weights, keep_every=stride, verify=verify, progress=progress)
    return ReplayedStates(final, kept, stride, weights)


def relative_difference(params: Params, stored: Params) -> float:
    """The largest relative (Frobenius) difference between two sets of weights, over the tensors of `stored`."""
    return max((params[name] - stored[name]).norm().item() / max(stored[name].norm().item(), 1e-12) for name in stored)


def _verify(params: Params, stored: Params, step: int, tolerance: float) -> None:
    """Raise DataError unless the replayed weights after `step` match the stored checkpoint."""
    error = relative_difference(params, stored)
    if not error <= tolerance:
        raise DataError(
            f"the run does not replay: after step {step} the replayed weights differ from the stored checkpoint by {error:.2e} "
            f"(relative, more than {tolerance:g}); nondeterministic kernels, a changed data source or an optimizer the record "
            "does not describe can cause this"
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
        states = replayed_states(plan, at_weight, stride=stride, verify=verify and at_weight == 1, progress=lambda done, _: progress(done, total))
    dtype = states.weights.dtype
    query_x = query_x.to(device=plan.train_y.device, dtype=dtype)
    query_y = query_y.to(plan.train_y.device)
    final = {name: value.detach().requires_grad_() for name, value in states.final.items()}
    with torch.enable_grad():
        measurements = plan.task.measurement(lambda inputs: functional_call(plan.model, final, (inputs,)), query_x, query_y)
        eye = torch.eye(len(query_y), dtype=dtype, device=query_x.device)
        adjoint_params = dict(zip(final, torch.autograd.grad(measurements, list(final.values()), eye, is_grads_batched=True)))
    result = torch.zeros(len(query_y), len(plan.train_y), dtype=dtype, device=query_x.device)
    with one_thread(is_small(plan.model)):
        _walk_back(plan, states, adjoint_params, result, lambda done: progress(forward_steps + done, total))
    return result


def _walk_back(plan: ReplayPlan, states: ReplayedStates, adjoint_params: Params, result: torch.Tensor, progress: Callable[[int], None]) -> None:
    """Carry the adjoints back from the end to the plan's first step, adding each batch's weight derivatives to result (Q, N).

    Segment by segment from the last: the segment's steps are recomputed from its kept state
    with their graphs, then walked back one by one (memory: one segment's graphs).
    """
    step_function, adjoint_state, done = StepFunction(plan), None, 0
    for start in sorted(states.kept, reverse=True):
        stop = min(start + states.stride, plan.n_steps)
        traced = _recompute(plan, step_function, states.kept[start], start, stop, states.weights)
        for index in reversed(range(start, stop)):
            step = plan.steps[index]
            adjoint_params, adjoint_state, adjoint_weights = traced.pop().pull_back(adjoint_params, adjoint_state)
            result.index_add_(1, step.rows, adjoint_weights.detach())
            adjoint_params = {name: value.detach() for name, value in adjoint_params.items()}
            adjoint_state = None if _starts_stage(plan, index) else {key: value.detach() for key, value in adjoint_state.items()}
            done += 1  # the stage's optimizer state was created fresh: nothing flows back through it
            progress(done)


def _recompute(plan: ReplayPlan, step_function: StepFunction, kept: tuple[Params, OptimizerState], start: int, stop: int,
               weights: torch.Tensor) -> list[TracedStep]:
    """Steps start..stop-1 recomputed from the kept state before step `start`, each with its graph."""
    params, state = kept
    traced = []
    for index in range(start, stop):
        step = plan.steps[index]
        if _starts_stage(plan, index) and index != start:
            state = _fresh_state(params, step.optimizer)
        traced.append(step_function.traced(step, params, state, weights[step.rows]))
        params, state = traced[-1].after()
    return traced


def retrain_by_replay(run: Run, weights: torch.Tensor, *, task: Task | None = None, progress: ProgressFn = no_progress) -> nn.Module:
    """The run retrained in its recorded batch order with example weights (N,) (0: removed, its batch slot kept): the final model."""
    plan = replay_plan(run, task=task)
    final, _ = replay_forward(plan, torch.as_tensor(weights), verify=False, progress=progress)
    model = plan.model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(final[name])
    return model.eval()
