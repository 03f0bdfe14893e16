"""Influence functions with Kronecker-factored curvature: EK-FAC (default) and K-FAC.

    τ(z_q, z_m) = −∇f(z_q; θ)ᵀ (G + λI)⁻¹ ∇L(z_m; θ)      (positive = proponent)
at the final checkpoint θ (the last of inputs.checkpoints), with G the curvature of the MEAN
training loss, block-diagonal over the tracked layers and Kronecker-factored within each layer
(curvature.py), and λ a per-layer damping. Same scale as exact influence (methods/exact.py): no
extra 1/N. Removing z_m changes f(z_q) by about −τ / N.

`fit` keeps only each layer's eigenbases and eigenvalues (about the size of the model); `score`
preconditions the queries' measurement gradients, Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ, and streams
the training set once per block of queries, dotting them with Σ_t g_t a_tᵀ without forming
per-example training gradients. Self-influence is ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m), a positive
magnitude (loss gradient on both sides, as exact influence), which ranks suspected mislabels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..curvature import (
    FISHERS,
    LayerBasis,
    LayerMatrices,
    basis_state,
    eigenbasis,
    example_gradients,
    fit_corrected_eigenvalues,
    fit_covariances,
    load_basis,
    precondition,
    stream_inner_products,
    weighted_rotated_norms,
)
from ..errors import SettingsError
from ..projection import Progress, check_settings, layer_batches, n_chunks
from .base import AttributionInputs, TrainState

CURVATURES = ("ekfac", "kfac")


@dataclass
class InfluenceSettings:
    """Every knob of EK-FAC / K-FAC influence."""

    curvature: str = field(default="ekfac", metadata={"help": "ekfac (eigenvalues refitted in the Kronecker eigenbasis, one more data pass) or kfac (products of the factors' eigenvalues)"})
    damping: float | None = field(default=None, metadata={"help": "λ added to every eigenvalue (> 0); None: damping_ratio × the layer's mean eigenvalue, per layer"})
    damping_ratio: float = field(default=0.1, metadata={"help": "with damping=None, λ per layer as a fraction of its mean eigenvalue (> 0)"})
    fisher: str = field(default="true_fisher", metadata={"help": "true_fisher (labels sampled from the model: Gauss–Newton in expectation) or empirical (given labels)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled labels of the true Fisher"})
    query_batch_size: int = field(default=64, metadata={"help": "queries preconditioned per pass over the training set (memory: this × tracked parameters)"})

    def __post_init__(self) -> None:
        check_settings(
            self,
            curvature=self.curvature in CURVATURES,
            damping=self.damping is None or self.damping > 0,
            damping_ratio=self.damping_ratio > 0,
            fisher=self.fisher in FISHERS,
            query_batch_size=self.query_batch_size >= 1,
        )


def inverse_damped(damping: float):
    """h(σ) = 1 / (σ + λ): the damped inverse as an eigenvalue function."""
    return lambda eigenvalues: 1 / (eigenvalues + damping)


class Influence:
    """EK-FAC / K-FAC influence at the final checkpoint (see the module docstring)."""

    name: ClassVar[str] = "ekfac_if"

    def __init__(self, settings: InfluenceSettings | None = None):
        self.settings = settings or InfluenceSettings()

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """Per layer '{layer}/q_in', 'q_out', 'eig_in', 'eig_out', 'eigenvalues' (d_out, d_in) and 'damping' (1,)."""
        s, model = self.settings, inputs.checkpoints[-1]
        passes = 2 if s.curvature == "ekfac" else 1
        progress = Progress(inputs.progress, passes * n_chunks(len(inputs.train_y), inputs.batch_size))
        bases = eigenbasis(fit_covariances([model], inputs, fisher=s.fisher, key=(s.seed,), on_chunk=progress.step))
        if s.curvature == "ekfac":  # key (seed, 0): the same sampled labels as the covariance pass
            eigenvalues = fit_corrected_eigenvalues(model, bases, inputs, fisher=s.fisher, key=(s.seed, 0), on_chunk=progress.step)
        else:
            eigenvalues = {name: basis.kfac_eigenvalues() for name, basis in bases.items()}
        state = basis_state(bases, eigenvalues)
        for name, values in eigenvalues.items():
            state[f"{name}/damping"] = torch.tensor([self._damping(name, values)])
        return state

    def _damping(self, name: str, eigenvalues: torch.Tensor) -> float:
        if self.settings.damping is not None:
            return self.settings.damping
        damping = self.settings.damping_ratio * eigenvalues.mean().item()
        if damping <= 0:
            raise SettingsError(
                f"layer {name!r} has no curvature (no training gradient reaches it): give damping > 0 "
                "or leave the layer out of Task.tracked_modules"
            )
        return damping

    def _load(self, state: TrainState, inputs: AttributionInputs) -> tuple[dict[str, LayerBasis], LayerMatrices, dict[str, float]]:
        names = list(inputs.task.tracked_modules(inputs.checkpoints[-1]))
        bases, eigenvalues = load_basis(state, names, inputs.device)
        return bases, eigenvalues, {name: state[f"{name}/damping"].item() for name in names}

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train), positive = proponent."""
        model, block_size = inputs.checkpoints[-1], self.settings.query_batch_size
        bases, eigenvalues, damping = self._load(state, inputs)
        n_train_chunks = n_chunks(len(inputs.train_y), inputs.batch_size)
        progress = Progress(inputs.progress, n_chunks(len(query_y), block_size) * (1 + n_train_chunks))
        scores = []
        for start in range(0, len(query_y), block_size):
            query_grads = example_gradients(
                model, inputs.task, query_x[start : start + block_size], query_y[start : start + block_size],
                objective="measurement", batch_size=inputs.batch_size, device=inputs.device,
            )
            progress.step()
            preconditioned = {
                name: precondition(grads, bases[name], eigenvalues[name], inverse_damped(damping[name]))
                for name, grads in query_grads.items()
            }
            scores.append(-stream_inner_products(model, inputs, preconditioned, progress.step).cpu())
        return torch.cat(scores)

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m) (n_train,), a positive magnitude."""
        model = inputs.checkpoints[-1]
        bases, eigenvalues, damping = self._load(state, inputs)
        weights = {name: inverse_damped(damping[name])(values) for name, values in eigenvalues.items()}
        progress = Progress(inputs.progress, n_chunks(len(inputs.train_y), inputs.batch_size))
        result = torch.zeros(len(inputs.train_y), device=inputs.device)
        for start, layers in layer_batches(model, inputs.task, "loss", inputs.train_batches()):
            block = sum(weighted_rotated_norms(layer, bases[layer.name], weights[layer.name]) for layer in layers)
            result[start : start + len(block)] = block
            progress.step()
        return result.cpu()
