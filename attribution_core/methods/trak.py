"""TRAK (Park et al. 2023): random-projected gradients, a ridge regression, ensembled over checkpoints.

Per checkpoint s, with φ_i = Pᵀ∇θ f(z_i; θ_s) the projected measurement gradients (Φ: (N, k)) and
Q_ii = 1 − p_i (p_i the model's probability of z_i's label; Task.residual_weights):
    τ_s(z_q, z_i) = φ(z_q)ᵀ (ΦᵀΦ + λI)⁻¹ φ_i Q_ii / r̄,    τ = mean over the checkpoints s,
already proponent-positive. λ = damping_ratio × mean diagonal of ΦᵀΦ, so one ratio fits any
gradient scale.

Unit: the change of the query's measurement (the margin) from training with z_i rather than
without it. TRAK's derivation is a one-step Newton estimate of leave-one-out retraining of the
linearised model, a logistic regression on the features φ with the margin as its logit: for the
sum loss Σ_i log(1 + e^{−f_i}), ∇L_i = −Q_ii φ_i and the Hessian is ΦᵀRΦ with
R_ii = p_i(1 − p_i) = Q_ii(1 − Q_ii), so removing z_i lowers f(z_q) by about
φ(z_q)ᵀ (ΦᵀRΦ)⁻¹ φ_i Q_ii. TRAK replaces ΦᵀRΦ by ΦᵀΦ, which sets the direction of the kernel but
not its scale (far too large for a confident model, where R is near 0); r̄ puts the scale back:
the R-weighted mean r̄ = Σ R_ii ‖φ_i‖² / Σ ‖φ_i‖² (so r̄ΦᵀΦ and ΦᵀRΦ have the same trace), pooled
over the checkpoints so that it is one factor for all scores: rankings, LDS and TRAK's ensemble
are exactly TRAK's. With use_q=False the residual Q is left out and the scores are no longer
a change of the margin.

`fit` stores the preconditioned train features ψ_i = Q_ii (ΦᵀΦ + λI)⁻¹ φ_i / (r̄ S) per
checkpoint, so scoring costs the queries' projected gradients and a (queries x k)(k x N) product.
Self-influence is the diagonal of the pairwise scores, mean_s φ_iᵀ ψ_i: how much z_i's own margin
would drop if it were removed.
Under torch.distributed, Φ is computed by index ranges, one per rank, and all-gathered.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..distributed import local_rows
from ..errors import SettingsError
from ..numerics.gradients import AMP_DTYPES
from ..numerics.inputs import AttributionInputs, TrainState, batches, state_tensor
from ..numerics.linalg import damped_inverse
from ..numerics.projected_gradients import project_gradients, projected_features
from ..numerics.projection import DISTRIBUTIONS, PROJECTIONS, Projector, make_projector, tracked_layer_shapes
from ..progress import Progress, n_chunks
from ..task import Task
from ..validation import check_settings
from .base import Method

ROW_CHUNK = 4096
"""Training examples multiplied at a time: Φ's float32 products of this many rows are summed in float64 into ΦᵀΦ, and
the (N, k) preconditioned features and (queries, N) scores are formed this many rows or columns at a time."""


@dataclass
class TrakSettings:
    """Every knob of TRAK."""

    state_version: ClassVar[int] = 4
    """Part of the stored state's key: bumped when the same settings give other features or another unit (2: Kronecker
    block shapes, 3: feature order, 4: scores divided by r̄, a change of the margin)."""

    k: int = field(default=1024, metadata={"help": "projection dimension (features per example); ignored by identity"})
    projection: str = field(default="kronecker", metadata={"help": (
        "kronecker (per-layer, fast), dense (over all parameters, slow) or identity (exact, small models)")})
    projection_kind: str = field(default="rademacher", metadata={"help": "random entries: rademacher (±1) or gaussian"})
    kronecker_block: int = field(default=9, metadata={"help": (
        "kronecker: features per P_out ⊗ P_in block; 1 = independent rank-one features (as accurate as dense), 4 = about half of 1's "
        "projection work, 9 = a third of 1's (TRAK's LDS on three demo runs equal to 4's within the projection seed's spread: "
        "benchmarks/RESULTS.md, B3), 0 = one block per layer (cheapest, LoGra, least accurate)")})
    seed: int = field(default=0, metadata={"help": "seed of the random projection"})
    damping_ratio: float = field(default=1.0, metadata={"help": (
        "ridge λ as a fraction of the mean diagonal of ΦᵀΦ (>= 0); the best ratio grows with k (digits MLP: 0.25 at k=256, 1 at k=1024, "
        "2-4 at k=2048-4096)")})
    use_q: bool = field(default=True, metadata={"help": "weight train examples by Q_ii = 1 − p_i (TRAK's default)"})
    dense_chunk: int = field(default=65536, metadata={"help": "dense projection: parameters projected at a time (memory: batch x chunk)"})
    amp_dtype: str | None = field(default=None, metadata={"help": (
        "mixed-precision forward/backward: None (full precision), bfloat16 or float16; projections accumulate in float32")})

    def __post_init__(self) -> None:
        check_settings(
            self,
            k=self.k >= 1,
            projection=self.projection in PROJECTIONS,
            projection_kind=self.projection_kind in DISTRIBUTIONS,
            kronecker_block=self.kronecker_block >= 0,
            damping_ratio=self.damping_ratio >= 0,
            dense_chunk=self.dense_chunk >= 1,
            amp_dtype=self.amp_dtype is None or self.amp_dtype in AMP_DTYPES,
        )


def residual_weights(model: nn.Module, task: Task, chunks) -> torch.Tensor:
    """Q_ii of every example (n_examples,): the task's residual weights (1 − p_i for cross-entropy)."""
    with torch.no_grad():
        return torch.cat([task.residual_weights(model, x, y).float() for _, x, y in chunks])


class Trak(Method):
    """TRAK scores: projected-gradient ridge regression per checkpoint, averaged over checkpoints."""

    name = "trak"
    label = "TRAK"
    Settings = TrakSettings
    checkpoint_policy = "last5"
    has_self_influence = True
    self_influence_at_fit = True

    def projector(self, inputs: AttributionInputs) -> Projector:
        """The random projection the settings name, for the checkpoints' tracked layers."""
        shapes = tracked_layer_shapes(inputs.models[-1], inputs.task)
        s = self.settings
        return make_projector(
            s.projection, shapes, s.k, seed=s.seed, kind=s.projection_kind, block=s.kronecker_block, chunk=s.dense_chunk
        )

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """Preconditioned train features per checkpoint, 'preconditioned_{s}': (N, k), and 'self_influence': (N,).

        Every checkpoint's Φ is computed first (r̄ pools over all of them), then each Φ becomes its
        scaled Ψ in place in one pass: one (N, k) array per checkpoint is ever allocated (memory-mapped
        with inputs.scratch; on a GPU they stay in device memory until the end). Under torch.distributed
        each rank featurizes its index range (see distributed.py).
        """
        projector = self.projector(inputs)
        rows = local_rows(len(inputs.train_y))
        progress = Progress(inputs.progress, len(inputs.models) * n_chunks(rows.stop - rows.start, inputs.batch_size))
        features, residuals = [], []
        weighted_norms, norms = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for model in inputs.models:
            phi = self.train_features(model, inputs, projector, progress.step)
            q = residual_weights(model, inputs.task, inputs.train_batches(model=model)).to(phi.device)
            squared_norms = torch.cat([chunk.double().square().sum(dim=1) for chunk in phi.split(ROW_CHUNK)])
            weighted_norms += (q.double() * (1 - q.double()) @ squared_norms).cpu()  # R_ii = Q_ii (1 − Q_ii)
            norms += squared_norms.sum().cpu()
            features.append(phi)
            residuals.append(q if self.settings.use_q else None)
        # r̄ = 0 only when every Q_ii is 0 or 1: nothing left to learn, every score 0 or undefined alike
        scale = 1 / max((weighted_norms / norms).item(), torch.finfo(torch.float32).tiny)
        self_influence = torch.zeros(len(inputs.train_y), device=inputs.device)
        for phi, q in zip(features, residuals):
            self._precondition_in_place(phi, q, len(inputs.models), scale, self_influence)
        state: TrainState = {f"preconditioned_{s}": phi.cpu() for s, phi in enumerate(features)}
        state["self_influence"] = self_influence.cpu() * scale
        return state

    def train_features(self, model: nn.Module, inputs: AttributionInputs, projector: Projector, on_chunk=lambda: None) -> torch.Tensor:
        """Φ: projected measurement gradients of the whole training set (N, k), sharded over ranks."""
        return projected_features([model], inputs, projector, "measurement", on_chunk, self.settings.amp_dtype)

    def _project(self, model: nn.Module, inputs: AttributionInputs, projector: Projector, x: torch.Tensor, y: torch.Tensor,
                 on_chunk) -> torch.Tensor:
        """Projected measurement gradients of (x, y), (n, k), with the settings' precision."""
        chunks = batches(x, y, inputs.batch_size, inputs.device)
        return project_gradients(model, inputs.task, projector, "measurement", chunks, len(y), on_chunk, self.settings.amp_dtype)

    def _precondition_in_place(self, phi: torch.Tensor, q: torch.Tensor | None, n_models: int, scale: float,
                               self_influence: torch.Tensor) -> None:
        """Φ (N, k) becomes Ψ scale / n_models, ψ_i = Q_ii (ΦᵀΦ + λI)⁻¹ φ_i (q (N,) or None: Q = 1);
        self_influence (N,) += φ_iᵀ ψ_i / n_models."""
        # float32 products of ROW_CHUNK-row chunks (2x faster than float64 on a CPU), summed in float64:
        # relative error ~1e-7 against an all-float64 Gram matrix on the Fashion-MNIST MLP.
        gram = sum((chunk.T @ chunk).double() for chunk in phi.split(ROW_CHUNK))
        damping = self.settings.damping_ratio * gram.diagonal().mean().item()
        inverse = damped_inverse(gram, damping).float()
        weights = q.split(ROW_CHUNK) if q is not None else itertools.repeat(None)
        for rows, influence, weight in zip(phi.split(ROW_CHUNK), self_influence.split(ROW_CHUNK), weights):
            preconditioned = rows @ inverse
            if weight is not None:
                preconditioned *= weight[:, None]
            preconditioned /= n_models
            influence += (rows * preconditioned).sum(dim=1)
            rows.copy_(preconditioned.mul_(scale))  # φ_i is not needed any more: ψ_i takes its place, no second (N, k) array

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train): the change of each query's margin from training with each example, positive = proponent.

        Written ROW_CHUNK training examples at a time into inputs.result_array (memory-mapped with
        inputs.scratch): beside the scores, only a (n_queries, ROW_CHUNK) product is held.
        """
        projector = self.projector(inputs)
        progress = Progress(inputs.progress, len(inputs.models) * n_chunks(len(query_y), inputs.batch_size))
        preconditioned, query_features = [], []
        for s, model in enumerate(inputs.models):
            preconditioned.append(state_tensor(state, f"preconditioned_{s}", inputs.device))
            if preconditioned[-1].shape[1] != projector.k:
                raise SettingsError(f"state has {preconditioned[-1].shape[1]} features per example, settings give k={projector.k}: refit")
            query_features.append(self._project(model, inputs, projector, query_x, query_y, progress.step))
        scores = inputs.result_array(len(query_y), len(inputs.train_y))
        for start in range(0, len(inputs.train_y), ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)  # summed over checkpoints in order, as one product per checkpoint would be
            scores[:, rows] = sum(features @ train[rows].T for features, train in zip(query_features, preconditioned))
        return scores.cpu()

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """τ(z_i, z_i), the diagonal of the pairwise scores (n_train,): how much z_i's own margin would drop without it."""
        return state["self_influence"]
