"""Exact influence functions for small models: the reference that other methods are tested against.

    τ_IF(z_q, z_m) = −(1/N) ∇θ f(z_q)ᵀ (G + λI)⁻¹ ∇θ L(z_m)      (positive = proponent)
at the final checkpoint, over the tracked layers' parameters in the core's layout, with G the
curvature of the MEAN training loss (1/N) Σ_i L(z_i): the Gauss–Newton matrix
(1/N) Σ_i J_iᵀ H_i J_i (J_i: Jacobian of the model outputs, H_i: Hessian of the loss w.r.t. the
outputs, diag(p_i) − p_i p_iᵀ for cross-entropy) or the true Hessian. Unit: the change of the
query's measurement from training with z_m rather than without it, f_q(with) − f_q(without), to
first order. Removing z_m is up-weighting its term of the mean loss by ε = −1/N, and
dθ/dε = −(G + λI)⁻¹∇L(z_m) at a minimum of the loss plus (λ/2)‖θ‖² (Koh & Liang 2017): with
λ the L2 regulariser's coefficient this is the leave-one-out change exactly to first order
(tests/test_score_units.py). Self-influence is (1/N) ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m), the score of
z_m for the measurement −L(z_m): how much z_m's own loss would rise if it were removed (a
positive magnitude, in loss units).

Gradients here come from torch.func, independently of the layer capture in numerics/gradients.py, so
tests comparing the two check something real. Everything holds (n, P) or (P, P) matrices: keep
P to about 20k parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from ..errors import SettingsError
from ..numerics.gradients import objective_function
from ..numerics.inputs import AttributionInputs, TrainState, batches, state_tensor
from ..numerics.linalg import damped_inverse
from ..progress import Progress, n_chunks
from ..task import Task
from ..validation import check_settings
from .base import Method

CURVATURES = ("gauss_newton", "hessian")


@dataclass
class ExactSettings:
    """Every knob of exact influence."""

    state_version: ClassVar[int] = 2
    """Part of the stored state's key, so that scores stored under it are never reused in another unit (2: scores and
    self-influence divided by N, a change of the measurement)."""

    curvature: str = field(default="gauss_newton", metadata={"help": (
        "gauss_newton (PSD, the curvature EK-FAC approximates) or hessian (true Hessian of the mean loss)")})
    damping: float = field(default=0.01, metadata={"help": "λ added to every eigenvalue of the curvature (>= 0)"})
    absolute_eigenvalues: bool = field(default=True, metadata={"help": (
        "hessian: replace eigenvalues by their absolute values (negative curvature would make G + λI indefinite)")})

    def __post_init__(self) -> None:
        check_settings(self, curvature=self.curvature in CURVATURES, damping=self.damping >= 0)


def _parameter_names(modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Per tracked module, the model-level names of its weight (and bias) in layout order."""
    return {
        name: [f"{name}.{kind}" if name else kind for kind in ("weight", "bias") if getattr(module, kind) is not None]
        for name, module in modules.items()
    }


def tracked_parameters(model: nn.Module, task: Task) -> dict[str, torch.Tensor]:
    """Detached tracked parameters by model-level name, in the core's layout order."""
    modules = task.tracked_modules(model)
    return {
        parameter: getattr(modules[name], parameter.rsplit(".", 1)[-1]).detach()
        for name, parameters in _parameter_names(modules).items()
        for parameter in parameters
    }


def to_layout(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], leading: int) -> torch.Tensor:
    """Per-parameter tensors (*lead, *param_shape) as (*lead, P) in the core's layout."""
    columns = []
    for parameters in _parameter_names(modules).values():
        weight = tensors[parameters[0]]
        lead, d_out = weight.shape[:leading], weight.shape[leading]
        matrix = [weight.reshape(*lead, d_out, -1)] + [tensors[bias][..., None] for bias in parameters[1:]]
        columns.append(torch.cat(matrix, dim=-1).flatten(leading))
    return torch.cat(columns, dim=-1)


def from_layout(modules: dict[str, nn.Module], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of to_layout for one parameter vector (P,): model-level names to tensors."""
    tensors, offset = {}, 0
    for parameters, module in zip(_parameter_names(modules).values(), modules.values()):
        d_out = module.weight.shape[0]
        d_weight = module.weight[0].numel()
        d_in = d_weight + len(parameters) - 1
        matrix = flat[offset : offset + d_out * d_in].reshape(d_out, d_in)
        tensors[parameters[0]] = matrix[:, :d_weight].reshape(module.weight.shape)
        if len(parameters) == 2:
            tensors[parameters[1]] = matrix[:, d_weight]
        offset += d_out * d_in
    return tensors


def _bound(model: nn.Module, parameters: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function of its inputs with the given tracked parameters swapped in."""
    return lambda inputs: functional_call(model, parameters, (inputs,))


def _hessian(function: Callable) -> Callable:
    """Hessian w.r.t. the first argument, reverse over reverse (forward mode would load TorchScript decompositions)."""
    return jacrev(jacrev(function))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def flat_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, objective: str = "loss") -> torch.Tensor:
    """Per-example gradients (B, P) of the task's loss or measurement, in the core's layout."""
    modules = task.tracked_modules(model)
    function = objective_function(task, objective)

    def example_objective(parameters, x_i, y_i):
        return function(_bound(model, parameters), x_i[None], y_i[None])[0]

    device = _device(model)
    grads = vmap(grad(example_objective), in_dims=(None, 0, 0))(tracked_parameters(model, task), x.to(device), y.to(device))
    return to_layout(modules, grads, leading=1)


def _mean_over_chunks(
    chunk_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    on_chunk: Callable[[], None],
) -> torch.Tensor:
    """(1/n) Σ over chunks of chunk_sum(x_chunk, y_chunk), the chunks on the model's device."""
    total = 0
    for _, x_chunk, y_chunk in batches(x, y, batch_size, _device(model)):
        total = total + chunk_sum(x_chunk, y_chunk)
        on_chunk()
    return total / len(y)


def gauss_newton_matrix(
    model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256, on_chunk: Callable[[], None] = lambda: None
) -> torch.Tensor:
    """Gauss–Newton matrix (P, P) float64 of the mean training loss; model outputs (B, K)."""
    modules = task.tracked_modules(model)
    parameters = tracked_parameters(model, task)

    def example_outputs(parameters, x_i):
        return functional_call(model, parameters, (x_i[None],))[0]

    def loss_of_outputs(outputs_i, x_i, y_i):  # the task's loss with the model's outputs held fixed
        return task.train_loss(lambda _: outputs_i[None], x_i[None], y_i[None])[0]

    jacobians = vmap(jacrev(example_outputs), in_dims=(None, 0))
    output_hessians = vmap(_hessian(loss_of_outputs))

    def chunk_sum(x_chunk, y_chunk):
        jacobian = to_layout(modules, jacobians(parameters, x_chunk), leading=2).double()  # (B, K, P)
        with torch.no_grad():
            h = output_hessians(model(x_chunk), x_chunk, y_chunk).double()  # (B, K, K)
        return jacobian.flatten(0, 1).T @ (h @ jacobian).flatten(0, 1)

    return _mean_over_chunks(chunk_sum, model, x, y, batch_size, on_chunk)


def hessian_matrix(
    model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64, on_chunk: Callable[[], None] = lambda: None
) -> torch.Tensor:
    """Hessian (P, P) float64 of the mean training loss w.r.t. the tracked parameters."""
    modules = task.tracked_modules(model)
    flat = to_layout(modules, tracked_parameters(model, task), leading=0)

    def summed_loss(flat_parameters, x_chunk, y_chunk):
        return task.train_loss(_bound(model, from_layout(modules, flat_parameters)), x_chunk, y_chunk).sum()

    return _mean_over_chunks(lambda x_chunk, y_chunk: _hessian(summed_loss)(flat, x_chunk, y_chunk).double(),
                             model, x, y, batch_size, on_chunk)


class ExactInfluence(Method):
    """Influence functions with the explicit curvature matrix: small models only."""

    name = "exact_if"
    label = "exact influence (small models)"
    Settings = ExactSettings
    has_self_influence = True
    self_influence_at_fit = True
    max_parameters = 20_000
    """It holds P x P and N x P matrices."""

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """'preconditioned_train' = (G + λI)⁻¹∇L(z_m) / N (N, P) and 'self_influence' (N,), in the scores' unit."""
        model, s = inputs.models[-1], self.settings
        n_parameters = sum(p.numel() for p in tracked_parameters(model, inputs.task).values())
        if n_parameters > self.max_parameters:
            raise SettingsError(
                f"exact influence builds a {n_parameters} x {n_parameters} curvature matrix: this model is too large "
                f"(at most {self.max_parameters} tracked parameters); use ekfac, which approximates the same quantity"
            )
        n_batches = n_chunks(len(inputs.train_y), inputs.batch_size)
        progress = Progress(inputs.progress, 2 * n_batches)
        build = gauss_newton_matrix if s.curvature == "gauss_newton" else hessian_matrix
        curvature = build(model, inputs.task, inputs.train_view(model), inputs.train_y,
                          batch_size=inputs.batch_size, on_chunk=progress.step)
        inverse = damped_inverse(curvature, s.damping, absolute_eigenvalues=s.absolute_eigenvalues and s.curvature == "hessian")
        preconditioned, self_influence = [], []
        for _, x, y in inputs.train_batches(model=model):
            gradients = flat_gradients(model, inputs.task, x, y, "loss").double()
            chunk = gradients @ inverse / len(inputs.train_y)
            preconditioned.append(chunk.float())
            self_influence.append((gradients * chunk).sum(dim=1).float())
            progress.step()
        return {"preconditioned_train": torch.cat(preconditioned).cpu(), "self_influence": torch.cat(self_influence).cpu()}

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train): the change of each query's measurement from training with each example, positive = proponent."""
        model = inputs.models[-1]
        preconditioned = state_tensor(state, "preconditioned_train", inputs.device)
        progress = Progress(inputs.progress, n_chunks(len(query_y), inputs.batch_size))
        scores = []
        for _, x, y in batches(query_x, query_y, inputs.batch_size, inputs.device):
            scores.append(-(flat_gradients(model, inputs.task, x, y, "measurement").float() @ preconditioned.T).cpu())
            progress.step()
        return torch.cat(scores)

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """(1/N) ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m) (n_train,): how much z_m's own loss would rise without it."""
        return state["self_influence"]
