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
steps between two kept states are recomputed from the earlier one before they are walked back,
so memory grows as √T × parameters. The replayed weights are checked against every stored
checkpoint on the way (to about 1e-5 relative in float32), with an error naming the first step
where the run does not replay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from .errors import DataError, SettingsError
from .models import build_model
from .progress import ProgressFn, no_progress
from .run import Run
from .task import Task
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


def _fresh_state(params: Params) -> OptimizerState:
    """Optimizer state at the start of a stage: zero moments, no steps taken."""
    zeros = {f"m.{name}": torch.zeros_like(value) for name, value in params.items()}
    # The step count in float64: Adam's bias corrections β^t are taken in double precision, as torch.optim computes them.
    return zeros | {f"v.{name}": torch.zeros_like(value) for name, value in params.items()} | {
        "t": torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)}


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """√values with a zero (not infinite) derivative at 0, where Adam's moments are 0 too."""
    positive = values > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, values, torch.ones_like(values))), torch.zeros_like(values))


class StepFunction:
    """One optimizer step as a pure function (params, state, batch weights) -> (params, state), as torch.optim takes it."""

    def __init__(self, plan: ReplayPlan):
        self.plan = plan

        def batch_loss(params: Params, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            losses = plan.task.train_loss(lambda inputs: functional_call(plan.model, params, (inputs,)), x, y)
            return (weights * losses).sum() / len(y)  # the batch's size as trained: a removed example keeps its slot

        self._grad = grad(batch_loss)

    def __call__(self, step: Step, params: Params, state: OptimizerState, weights: torch.Tensor) -> tuple[Params, OptimizerState]:
        """The parameters and optimizer state after `step`, its batch's examples weighted by `weights` (|B|,)."""
        x, y = self.plan.views[step.stage][step.rows], self.plan.train_y[step.rows]
        gradients = self._grad(params, x, y, weights)
        gradients = {name: g + step.weight_decay * params[name] for name, g in gradients.items()} if step.weight_decay else gradients
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


def _starts_stage(plan: ReplayPlan, index: int) -> bool:
    return index == 0 or plan.steps[index].stage != plan.steps[index - 1].stage


def replay_forward(plan: ReplayPlan, weights: torch.Tensor | None = None, *, keep_every: int = 0, verify: bool = True,
                   tolerance: float = 1e-5, progress: ProgressFn = no_progress) -> tuple[Params, dict[int, tuple[Params, OptimizerState]]]:
    """(final parameters, kept states) of the run replayed with example weights (N,) (None: all 1).

    keep_every > 0 keeps the state before every keep_every-th step (by step index from the plan's
    start), for `metagradients`. With verify, the weights after every stored checkpoint's step must
    match it (relative error ≤ tolerance), else a DataError names the step.
    """
    step_function, params = StepFunction(plan), dict(plan.initial)
    dtype, device = next(iter(params.values())).dtype, next(iter(params.values())).device
    weights = torch.ones(len(plan.train_y), dtype=dtype, device=device) if weights is None else weights.to(device=device, dtype=dtype)
    state, kept = _fresh_state(params), {}
    with torch.no_grad(), one_thread(is_small(plan.model)):  # as the trainer: small models step faster on one thread
        for index, step in enumerate(plan.steps):
            if _starts_stage(plan, index):  # tdx's trainer builds a new optimizer for every stage
                state = _fresh_state(params)
            if keep_every and index % keep_every == 0:
                kept[index] = (params, state)
            params, state = step_function(step, params, state, weights[step.rows])
            number = plan.first_step + index
            if verify and number in plan.checkpoints:
                _verify(params, plan.checkpoints[number], number, tolerance)
            progress(index + 1, plan.n_steps)
    return params, kept


def _verify(params: Params, stored: Params, step: int, tolerance: float) -> None:
    """Raise DataError unless the replayed weights after `step` match the stored checkpoint."""
    error = max((params[name] - stored[name]).norm().item() / max(stored[name].norm().item(), 1e-12) for name in stored)
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
                  verify: bool = True, progress: ProgressFn = no_progress) -> torch.Tensor:
    """d f_q(θ_T) / d w_i (n_queries, n_train): each query's measurement after training, by each example's weight, at w = at_weight.

    Reverse mode through every step of the plan, the queries carried backward together as a
    block of adjoints (one batched vector-Jacobian product of the step per step).
    """
    stride = stride or default_stride(plan.n_steps)
    dtype = next(iter(plan.initial.values())).dtype
    weights = torch.full((len(plan.train_y),), float(at_weight), dtype=dtype, device=plan.train_y.device)
    final, kept = replay_forward(plan, weights, keep_every=stride, verify=verify and at_weight == 1,
                                 progress=lambda done, total: progress(done, 2 * total))
    query_x = query_x.to(device=plan.train_y.device, dtype=dtype)
    query_y = query_y.to(plan.train_y.device)

    def measurements(params: Params) -> torch.Tensor:
        return plan.task.measurement(lambda inputs: functional_call(plan.model, params, (inputs,)), query_x, query_y)

    _, pull_back = vjp(measurements, final)
    eye = torch.eye(len(query_y), dtype=dtype, device=query_x.device)
    adjoint_params = vmap(pull_back)(eye)[0]  # per query, ∇f_q(θ_T): (Q, ...) per parameter
    result = torch.zeros(len(query_y), len(plan.train_y), dtype=dtype, device=query_x.device)
    step_function, done = StepFunction(plan), plan.n_steps
    with one_thread(is_small(plan.model)):
        _walk_back(plan, step_function, kept, stride, weights, adjoint_params, result, done, progress)
    return result


def _walk_back(plan: ReplayPlan, step_function: StepFunction, kept: dict, stride: int, weights: torch.Tensor, adjoint_params: Params,
               result: torch.Tensor, done: int, progress: ProgressFn) -> None:
    """Carry the adjoints back from the end to the plan's first step, adding each batch's weight derivatives to result (Q, N)."""
    adjoint_state = None
    n_queries = len(result)
    for start in sorted(kept, reverse=True):
        states = _recompute(plan, step_function, kept[start], start, min(start + stride, plan.n_steps), weights)
        for index in reversed(range(start, min(start + stride, plan.n_steps))):
            step = plan.steps[index]
            params, state = states[index - start]
            batch_weights = weights[step.rows]
            _, pull_back = vjp(lambda p, s, w, step=step: step_function(step, p, s, w), params, state, batch_weights)
            cotangent_state = adjoint_state if adjoint_state is not None else {
                k: torch.zeros((n_queries, *v.shape), dtype=v.dtype, device=v.device) for k, v in state.items()}
            adjoint_params, adjoint_state, adjoint_weights = vmap(pull_back)((adjoint_params, cotangent_state))
            result.index_add_(1, step.rows, adjoint_weights)
            if _starts_stage(plan, index):  # the stage's optimizer state was created fresh: nothing flows back through it
                adjoint_state = None
            done += 1
            progress(done, 2 * plan.n_steps)


def _recompute(plan: ReplayPlan, step_function: StepFunction, kept: tuple[Params, OptimizerState], start: int, stop: int,
               weights: torch.Tensor) -> list[tuple[Params, OptimizerState]]:
    """The states before steps start..stop-1, recomputed from the kept one before step `start`."""
    params, state = kept
    states = []
    with torch.no_grad():
        for index in range(start, stop):
            if _starts_stage(plan, index) and index != start:
                state = _fresh_state(params)
            states.append((params, state))
            step = plan.steps[index]
            params, state = step_function(step, params, state, weights[step.rows])
    return states


def retrain_by_replay(run: Run, weights: torch.Tensor, *, task: Task | None = None, progress: ProgressFn = no_progress) -> nn.Module:
    """The run retrained in its recorded batch order with example weights (N,) (0: removed, its batch slot kept): the final model."""
    plan = replay_plan(run, task=task)
    final, _ = replay_forward(plan, torch.as_tensor(weights), verify=False, progress=progress)
    model = plan.model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(final[name])
    return model.eval()
