"""Influence functions with Kronecker-factored curvature: EK-FAC (default) and K-FAC.

    τ(z_q, z_m) = −(1/N) ∇f(z_q; θ)ᵀ (G + λI)⁻¹ ∇L(z_m; θ)      (positive = proponent)
at the final checkpoint θ (the last of inputs.models), with G the curvature of the MEAN
training loss, block-diagonal over the tracked layers and Kronecker-factored within each layer
(numerics/curvature.py), and λ a per-layer damping. Unit: the change of the query's measurement (the
margin by default) from training with z_m rather than without it. Removing z_m from
(1/N) Σ_i L(z_i) is up-weighting its term by ε = −1/N, which moves θ by (1/N)(G + λI)⁻¹∇L(z_m)
to first order (Koh & Liang 2017), hence the 1/N (N = len(train_y)); the same quantity as exact
influence (methods/exact.py), which tests/test_score_units.py checks against leave-one-out
retraining.

`fit` keeps only each layer's eigenbases and eigenvalues (about the size of the model). `score`
works in the Kronecker eigenbasis (numerics/curvature.py): the queries' rotated measurement gradients are
weighted by 1 / (Λ + λ) once, and one pass over the training set (per block of queries, a block
being as many as QUERY_BUDGET holds) dots them with the rotated training gradients, one matrix
product per layer and chunk. With `k` set, fit also stores the k-dim Kronecker
projections of the rotated training gradients (LoGra-style, one more data pass) and scoring is
one (queries x k)(k x N) product, as TRAK's: an unbiased estimate of the exact score.

Self-influence is (1/N) ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m) = (1/N) Σ (Q_Sᵀ∇W_m Q_A)² / (Λ + λ), the
score of z_m for the measurement −L(z_m): how much z_m's own loss would rise if it were removed
(a positive magnitude, in loss units), which ranks suspected mislabels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import SettingsError
from ..numerics.curvature import (
    FISHERS,
    LayerBasis,
    LayerMatrices,
    Scratch,
    balancing_scales,
    basis_state,
    check_projected_features,
    eigenbasis,
    fit_corrected_eigenvalues,
    fit_covariances,
    layer_slices,
    load_basis,
    local_chunks,
    projected_query_vectors,
    projected_train_gradients,
    query_block_size,
    rotated_query_gradients,
    scoring_projector,
    stream_rotated_products,
    weighted_rotated_norms,
)
from ..numerics.inputs import AttributionInputs, TrainState, state_tensor
from ..numerics.projection import KroneckerProjector
from ..progress import Progress, n_chunks
from ..validation import check_settings
from .base import Method
from .kronecker_settings import fisher_field, k_field, kronecker_block_field, query_batch_size_field, seed_field

CURVATURES = ("ekfac", "kfac")


@dataclass
class InfluenceSettings:
    """Every knob of EK-FAC / K-FAC influence."""

    state_version: ClassVar[int] = 2
    """Part of the stored state's key, so that scores stored under it are never reused in another unit (2: scores and
    self-influence divided by N, a change of the measurement)."""

    curvature: str = field(default="ekfac", metadata={"help": (
        "ekfac (eigenvalues refitted in the Kronecker eigenbasis, one more data pass) or kfac (products of the factors' eigenvalues)")})
    damping: float | None = field(default=None, metadata={"help": (
        "λ added to every eigenvalue (> 0); None: damping_ratio × the layer's mean eigenvalue, per layer")})
    damping_ratio: float = field(default=1.0, metadata={"help": (
        "with damping=None, λ per layer as a fraction of its mean eigenvalue (> 0); 1 beat the common 0.1 on every LDS benchmark here (B1 "
        "digits 0.540 vs 0.478, B2 0.318 vs 0.254 and 0.226 vs 0.192)")})
    fisher: str = fisher_field()
    seed: int = seed_field()
    query_batch_size: int | None = query_batch_size_field(
        "queries scored per pass over the training set (memory: this × tracked parameters)")
    k: int | None = k_field("each block of queries streams the training set", "the rotated training gradients and scoring is one product "
                            "(LoGra-style, approximate, far faster for many queries)")
    kronecker_block: int = kronecker_block_field()

    def __post_init__(self) -> None:
        check_settings(
            self,
            k=self.k is None or self.k >= 1,
            kronecker_block=self.kronecker_block >= 0,
            curvature=self.curvature in CURVATURES,
            damping=self.damping is None or self.damping > 0,
            damping_ratio=self.damping_ratio > 0,
            fisher=self.fisher in FISHERS,
            query_batch_size=self.query_batch_size is None or self.query_batch_size >= 1,
        )


class Influence(Method):
    """EK-FAC influence at the final checkpoint (see the module docstring); K-FAC is its preset below."""

    name = "ekfac"
    label = "EK-FAC influence"
    Settings = InfluenceSettings
    has_self_influence = True

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """Per layer '{layer}/q_in', 'q_out', 'eig_in', 'eig_out', 'eigenvalues' (d_out, d_in) and 'damping' (1,)."""
        s, model = self.settings, inputs.models[-1]
        passes = (2 if s.curvature == "ekfac" else 1) + (s.k is not None)
        progress = Progress(inputs.progress, passes * local_chunks(inputs))
        bases = eigenbasis(fit_covariances([model], inputs, fisher=s.fisher, key=(s.seed,), on_chunk=progress.step))
        if s.curvature == "ekfac":  # key (seed, 0): the same sampled labels as the covariance pass
            eigenvalues = fit_corrected_eigenvalues(model, bases, inputs, fisher=s.fisher, key=(s.seed, 0), on_chunk=progress.step)
        else:
            eigenvalues = {name: basis.kfac_eigenvalues() for name, basis in bases.items()}
        state = basis_state(bases, eigenvalues)
        for name, values in eigenvalues.items():
            state[f"{name}/damping"] = torch.tensor([self._damping(name, values)])
        projector = self._projector(inputs)
        if projector is not None:
            scales = balancing_scales(self._weights(state, eigenvalues))
            state["train_features"] = projected_train_gradients([model], bases, scales, inputs, projector, progress.step).cpu()
        return state

    def _projector(self, inputs: AttributionInputs) -> KroneckerProjector | None:
        s = self.settings
        return scoring_projector(s.k, s.kronecker_block, s.seed, inputs.models[-1], inputs.task)

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

    def _load(self, state: TrainState, inputs: AttributionInputs) -> tuple[dict[str, LayerBasis], LayerMatrices]:
        """Per layer, the basis and the eigenvalue weights 1 / (Λ + λ) (d_out, d_in)."""
        names = list(inputs.task.tracked_modules(inputs.models[-1]))
        bases, eigenvalues = load_basis(state, names, inputs.device)
        return bases, self._weights(state, eigenvalues)

    @staticmethod
    def _weights(state: TrainState, eigenvalues: LayerMatrices) -> LayerMatrices:
        """1 / (Λ + λ) per layer."""
        return {name: 1 / (values + state[f"{name}/damping"].item()) for name, values in eigenvalues.items()}

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train): the change of each query's measurement from training with each example, positive = proponent."""
        model = inputs.models[-1]
        bases, weights = self._load(state, inputs)
        projector = self._projector(inputs)
        if projector is not None:
            features = check_projected_features(state_tensor(state, "train_features", inputs.device), projector)
            scales = balancing_scales(weights)
        block_size = query_block_size(self.settings.query_batch_size, bases)
        n_train_chunks = 0 if projector is not None else n_chunks(len(inputs.train_y), inputs.batch_size)
        progress = Progress(inputs.progress, n_chunks(len(query_y), block_size) * (1 + n_train_chunks))
        scores = []
        for start in range(0, len(query_y), block_size):
            query_grads = rotated_query_gradients(
                model, bases, inputs.task, query_x[start : start + block_size], query_y[start : start + block_size],
                batch_size=inputs.batch_size, device=inputs.device,
            )
            progress.step()
            weighted = {name: grads * weights[name] for name, grads in query_grads.items()}
            if projector is not None:
                products = projected_query_vectors(projector, weighted, scales) @ features.T
            else:
                products = stream_rotated_products([model], bases, inputs, weighted, progress.step)
            scores.append(-products.cpu() / len(inputs.train_y))
        return torch.cat(scores)

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """(1/N) ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m) (n_train,): how much z_m's own loss would rise without it."""
        model = inputs.models[-1]
        bases, weights = self._load(state, inputs)
        progress = Progress(inputs.progress, n_chunks(len(inputs.train_y), inputs.batch_size))
        result, scratch = torch.zeros(len(inputs.train_y), device=inputs.device), Scratch()
        for rows, name, layers in layer_slices([model], inputs.task, "loss", inputs.model_batches([model]), progress.step):
            result[rows] += weighted_rotated_norms(layers[0], bases[name], weights[name], scratch)
        return result.cpu() / len(inputs.train_y)


class KfacInfluence(Influence):
    """K-FAC influence: EK-FAC's influence with the Kronecker factors' own eigenvalues (no refitting pass)."""

    name = "kfac"
    label = "K-FAC influence"
    preset = {"curvature": "kfac"}
