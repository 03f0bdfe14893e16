"""Kronecker-factored curvature of the training loss per tracked layer: K-FAC and EK-FAC.

For a tracked layer with per-example weight gradient ∇W_m = Σ_t g_t a_tᵀ (d_out, d_in; see
gradients.py), the curvature block G = E_m[vec ∇W_m vec ∇W_mᵀ] is approximated by
    A = E_{m,t}[a_t a_tᵀ]          (d_in, d_in): mean over examples AND positions,
    S = E_m[Σ_t g_t g_tᵀ]          (d_out, d_out): mean over examples, SUM over positions,
so that G ≈ S ⊗ A (row-major layout of W) when positions are independent and alike (the KFC
convention of Grosse & Martens 2016, as in kronfluence); for T = 1 this is plain K-FAC.
g is the gradient of each example's own loss ℓ_m (not of the mean), so G ≈ E_m[∇ℓ_m ∇ℓ_mᵀ]:
- fisher="true_fisher": labels drawn from the model's predictive distribution softmax(model(x))
  (the task's outputs must be class logits). Its expectation over the draws is the Gauss–Newton
  matrix of the mean cross-entropy, the curvature exact influence uses. Draws are seeded and
  fixed per example (inverse-CDF with one uniform per example), so they do not depend on the
  chunk size.
- fisher="empirical": the given labels (the empirical Fisher; cheaper to reason about, biased).

EK-FAC (George et al. 2018) keeps the eigenbases Q_A, Q_S of A and S and refits the eigenvalues:
Λ*_oi = E_m[((Q_Sᵀ ∇W_m Q_A)_oi)²], the exact diagonal of G in the Kronecker eigenbasis; K-FAC's
are λ_S,o λ_A,i. Any function h of the eigenvalues is applied to a layer gradient V as
Q_S [(Q_Sᵀ V Q_A) ⊙ h(Λ)] Q_Aᵀ (`precondition`): influence uses h(σ) = 1/(σ + λ), SOURCE the
r-factor and exp(−xσ). Factors average over several models (SOURCE's segment checkpoints).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import SettingsError
from .gradients import LayerBatch, capture_layer_batches
from .methods.base import AttributionInputs
from .projection import batches, layer_batches
from .task import Task

FISHERS = ("true_fisher", "empirical")

LayerMatrices = dict[str, torch.Tensor]
"""Per tracked layer name, tensors over its weight matrix: (d_out, d_in) or (n, d_out, d_in)."""


@dataclass
class LayerCovariances:
    """Kronecker factors of one layer: inputs (d_in, d_in) = A and output gradients (d_out, d_out) = S."""

    inputs: torch.Tensor
    output_grads: torch.Tensor


@dataclass
class LayerBasis:
    """Eigenbases and eigenvalues of one layer's factors: q_in (d_in, d_in) of A, q_out (d_out, d_out) of S."""

    q_in: torch.Tensor
    q_out: torch.Tensor
    eig_in: torch.Tensor
    eig_out: torch.Tensor

    def kfac_eigenvalues(self) -> torch.Tensor:
        """K-FAC's eigenvalues λ_S,o λ_A,i (d_out, d_in); rounding negatives of PSD factors clipped to 0."""
        return torch.outer(self.eig_out.clamp_min(0), self.eig_in.clamp_min(0))

    def rotate(self, matrices: torch.Tensor) -> torch.Tensor:
        """Q_Sᵀ V Q_A for V (..., d_out, d_in)."""
        return self.q_out.T @ matrices @ self.q_in

    def unrotate(self, matrices: torch.Tensor) -> torch.Tensor:
        """Q_S V Q_Aᵀ for V (..., d_out, d_in): the inverse of rotate."""
        return self.q_out @ matrices @ self.q_in.T


def check_fisher(fisher: str) -> None:
    """Raise SettingsError unless fisher names a known Fisher."""
    if fisher not in FISHERS:
        raise SettingsError(f"fisher={fisher!r}: choose one of {FISHERS}")


def label_uniforms(n_examples: int, key: Sequence[int]) -> torch.Tensor:
    """One uniform (n_examples,) per example, fixed by key and drawn on the CPU (device-independent)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.rand(n_examples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Labels (B,) drawn from softmax(logits) (B, K) by inverse CDF of the given uniforms (B,)."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    labels = torch.searchsorted(cdf, uniforms.to(cdf.device)[:, None]).squeeze(1)
    return labels.clamp_max(logits.shape[1] - 1)  # a uniform above a rounded-down total


def loss_layer_batches(
    model: nn.Module, inputs: AttributionInputs, fisher: str, key: Sequence[int]
) -> Iterator[tuple[int, list[LayerBatch]]]:
    """(start, layers) per training chunk: a and g of each example's loss, labels given or sampled.

    key fixes the sampled labels (true_fisher): the same key gives the same labels.
    """
    check_fisher(fisher)
    modules = inputs.task.tracked_modules(model)
    uniforms = label_uniforms(len(inputs.train_y), key) if fisher == "true_fisher" else None
    for start, x, y in inputs.train_batches():
        if uniforms is not None:
            with torch.no_grad():
                y = sample_labels(model(x), uniforms[start : start + len(y)])
        yield start, capture_layer_batches(model, modules, inputs.task.train_loss, x, y)


def fit_covariances(
    models: Sequence[nn.Module],
    inputs: AttributionInputs,
    *,
    fisher: str = "true_fisher",
    key: Sequence[int] = (0,),
    on_chunk: Callable[[], None] = lambda: None,
) -> dict[str, LayerCovariances]:
    """A and S per tracked layer, averaged over the models; model i's labels are keyed by (*key, i)."""
    input_sums: LayerMatrices = {}
    grad_sums: LayerMatrices = {}
    positions: dict[str, int] = {}
    for index, model in enumerate(models):
        for _, layers in loss_layer_batches(model, inputs, fisher, (*key, index)):
            for layer in layers:
                a, g = layer.inputs.flatten(0, 1), layer.output_grads.flatten(0, 1)
                input_sums[layer.name] = a.T @ a + input_sums.get(layer.name, 0)
                grad_sums[layer.name] = g.T @ g + grad_sums.get(layer.name, 0)
                positions[layer.name] = len(a) + positions.get(layer.name, 0)
            on_chunk()
    n_examples = len(models) * len(inputs.train_y)
    return {name: LayerCovariances(input_sums[name] / positions[name], grad_sums[name] / n_examples) for name in input_sums}


def _symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix, computed in float64 for accuracy."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    return eigenvalues.to(matrix.dtype), eigenvectors.to(matrix.dtype)


def eigenbasis(covariances: dict[str, LayerCovariances]) -> dict[str, LayerBasis]:
    """Per layer, the eigendecompositions of A and S."""
    bases = {}
    for name, factors in covariances.items():
        eig_in, q_in = _symmetric_eigh(factors.inputs)
        eig_out, q_out = _symmetric_eigh(factors.output_grads)
        bases[name] = LayerBasis(q_in, q_out, eig_in, eig_out)
    return bases


def _rotated_factors(layer: LayerBatch, basis: LayerBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """g Q_S (B, T, d_out) and a Q_A (B, T, d_in): Q_Sᵀ ∇W_m Q_A = Σ_t (g_t Q_S)ᵀ (a_t Q_A)."""
    return layer.output_grads @ basis.q_out, layer.inputs @ basis.q_in


def squared_rotated_sums(layer: LayerBatch, basis: LayerBasis) -> torch.Tensor:
    """Σ_m (Q_Sᵀ ∇W_m Q_A)² over the chunk's examples (d_out, d_in)."""
    grads, inputs = _rotated_factors(layer, basis)
    if grads.shape[1] == 1:  # rank one per example: Σ_m u_m² (v_m²)ᵀ, no per-example gradient
        return grads[:, 0].square().T @ inputs[:, 0].square()
    return torch.einsum("bto,bti->boi", grads, inputs).square().sum(dim=0)


def weighted_rotated_norms(layer: LayerBatch, basis: LayerBasis, weights: torch.Tensor) -> torch.Tensor:
    """Σ_oi w_oi (Q_Sᵀ ∇W_m Q_A)²_oi per example (B,), weights (d_out, d_in)."""
    grads, inputs = _rotated_factors(layer, basis)
    if grads.shape[1] == 1:  # rank one per example: Σ_oi u_o² w_oi v_i², no per-example gradient
        return ((grads[:, 0].square() @ weights) * inputs[:, 0].square()).sum(dim=1)
    return (torch.einsum("bto,bti->boi", grads, inputs).square() * weights).sum(dim=(1, 2))


def fit_corrected_eigenvalues(
    model: nn.Module,
    bases: dict[str, LayerBasis],
    inputs: AttributionInputs,
    *,
    fisher: str = "true_fisher",
    key: Sequence[int] = (0, 0),
    on_chunk: Callable[[], None] = lambda: None,
) -> LayerMatrices:
    """EK-FAC eigenvalues Λ* = E_m[(Q_Sᵀ ∇W_m Q_A)²] (d_out, d_in) per layer at one model."""
    sums: LayerMatrices = {}
    for _, layers in loss_layer_batches(model, inputs, fisher, key):
        for layer in layers:
            sums[layer.name] = squared_rotated_sums(layer, bases[layer.name]) + sums.get(layer.name, 0)
        on_chunk()
    return {name: total / len(inputs.train_y) for name, total in sums.items()}


def precondition(
    layer_grads: torch.Tensor, basis: LayerBasis, eigenvalues: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Q_S [(Q_Sᵀ V Q_A) ⊙ h(Λ)] Q_Aᵀ for V (n, d_out, d_in), eigenvalues Λ (d_out, d_in), h = transform."""
    return basis.unrotate(basis.rotate(layer_grads) * transform(eigenvalues))


def inner_products(vectors: torch.Tensor, layer: LayerBatch) -> torch.Tensor:
    """⟨V_q, ∇W_m⟩ = Σ_t g_tᵀ V_q a_t (n_vectors, B) for V (n_vectors, d_out, d_in)."""
    if layer.inputs.shape[1] == 1:  # (V_q a_m) · g_m: no per-example gradient
        return (layer.inputs[:, 0] @ vectors.transpose(1, 2) * layer.output_grads[:, 0]).sum(dim=-1)
    # Over T positions the chunk's gradients (B, d_out, d_in) cost less than any route around
    # them: contracting V with every a_t first would hold (n_vectors, B, T, d_out).
    return vectors.flatten(1) @ layer.per_example_gradients().flatten(1).T


def example_gradients(
    model: nn.Module,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    objective: str,
    batch_size: int,
    device: torch.device,
) -> LayerMatrices:
    """Per layer, per-example gradients (n, d_out, d_in) of the objective: for a few examples only."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for _, layers in layer_batches(model, task, objective, batches(x, y, batch_size, device)):
        for layer in layers:
            chunks.setdefault(layer.name, []).append(layer.per_example_gradients())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def stream_inner_products(
    model: nn.Module, inputs: AttributionInputs, vectors: LayerMatrices, on_chunk: Callable[[], None] = lambda: None
) -> torch.Tensor:
    """Σ_layers ⟨V_q, ∇L(z_m)⟩ (n_vectors, n_train) for V (n_vectors, d_out, d_in) per layer, one training pass."""
    n_vectors = next(iter(vectors.values())).shape[0]
    products = torch.zeros(n_vectors, len(inputs.train_y), device=inputs.device)
    for start, layers in layer_batches(model, inputs.task, "loss", inputs.train_batches()):
        block = sum(inner_products(vectors[layer.name], layer) for layer in layers)
        products[:, start : start + block.shape[1]] = block
        on_chunk()
    return products


BASIS_PARTS = ("q_in", "q_out", "eig_in", "eig_out")


def basis_state(bases: dict[str, LayerBasis], eigenvalues: LayerMatrices, prefix: str = "") -> dict[str, torch.Tensor]:
    """Bases and eigenvalues as flat CPU tensors named '{prefix}{layer}/{part}'."""
    state = {}
    for name, basis in bases.items():
        for part in BASIS_PARTS:
            state[f"{prefix}{name}/{part}"] = getattr(basis, part).cpu()
        state[f"{prefix}{name}/eigenvalues"] = eigenvalues[name].cpu()
    return state


def load_basis(
    state: dict[str, torch.Tensor], layer_names: Sequence[str], device: torch.device, prefix: str = ""
) -> tuple[dict[str, LayerBasis], LayerMatrices]:
    """Inverse of basis_state for the given layers, on the device."""
    missing = [f"{prefix}{name}/eigenvalues" for name in layer_names if f"{prefix}{name}/eigenvalues" not in state]
    if missing:
        raise SettingsError(f"the fitted state has no {missing} (fitted with other settings, layers or checkpoints?): fit again")
    bases = {name: LayerBasis(*(state[f"{prefix}{name}/{part}"].to(device) for part in BASIS_PARTS)) for name in layer_names}
    return bases, {name: state[f"{prefix}{name}/eigenvalues"].to(device) for name in layer_names}
