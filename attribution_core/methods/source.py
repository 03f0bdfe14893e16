"""SOURCE (Bae, Lin, Lorraine, Grosse 2024): approximate unrolled differentiation over segments.

Training is cut into segments ℓ = 1..L (inputs.segments, planned by numerics/segments.py); within one the
curvature H̄_ℓ and z_m's loss gradient ḡ_ℓ(z_m) are replaced by averages over its checkpoints.
With x_ℓ = η̄_ℓK_ℓ (the segment's lr_sum), S̄_ℓ = exp(−x_ℓH̄_ℓ) and
r̄_ℓ(z_m) = (1/N)(I − exp(−x_ℓH̄_ℓ))H̄_ℓ⁻¹ḡ_ℓ(z_m):
    dθ_T/dε ≈ −Σ_ℓ (S̄_L ⋯ S̄_ℓ₊₁) r̄_ℓ(z_m),     τ(z_q, z_m) = ∇f(z_q; θ_T)ᵀ dθ_T/dε,
already proponent-positive (ε up-weights z_m's loss term). Computed query-side:
v_L = ∇f(z_q; θ_T), contribution_ℓ = −(1/N) v_ℓᵀ r(H̄_ℓ) ḡ_ℓ(z_m) with r(σ) = (1 − e^{−xσ})/σ
(= x at σ = 0: no damping needed), then v_ℓ₋₁ = S̄_ℓ v_ℓ. θ_T is the last checkpoint of the
last segment.

What each segment trained on (Segment.weights, from the run's record): the segment's objective is
(1/N) Σ_m w_ℓ,m L(z_m), w_ℓ,m (mean 1) example m's share of the segment's batches, each step
counted by its η/(1 − β) (TrainingRecord.draw_weights). So H̄_ℓ is fitted with those weights, and
z_m's contribution to segment ℓ is w_ℓ,m times the formula above: 0 for an example the segment
never drew (a stage training other classes), 1 for all when every step draws from the whole set.
Gradients at a checkpoint are taken on the training inputs as its stage saw them (inputs.views).

H̄_ℓ is EK-FAC (numerics/curvature.py): factors A, S averaged over the segment's checkpoints give one
eigenbasis per layer and segment; the corrected eigenvalues are fitted at every checkpoint in
that basis, averaged, and negatives clipped to 0. Both r and exp act on eigenvalues in the same
per-layer basis, so each layer is handled on its own (H̄ is block-diagonal).

Scoring works in each segment's rotated coordinates (numerics/curvature.py): v_L is the queries' rotated
measurement gradient, r(H̄_ℓ) and S̄_ℓ are elementwise products there, and v_ℓ₋₁ moves into
segment ℓ−1's basis by one dense product per layer (`basis_change`). Because the score is linear
in ḡ_ℓ, the training side is the rotated mean gradient of z_m over the segment's checkpoints,
formed chunk by chunk (a sum of rank-one terms for Linear layers) and met by all queries in one
matrix product per layer: per block of queries, one pass over the training set, with one
forward and backward per checkpoint and chunk, and L query-by-example products per layer.
With `k` set the training side is stored at fit instead: per segment, the k-dim
Kronecker projections of the rotated mean gradients, balanced by √r(H̄_ℓ) (numerics/curvature.py), and
each segment's contribution is one (queries x k)(k x N) product (approximate, unbiased).

Unit: the change of the query's measurement (the margin by default) from training with z_m
rather than without it, to first order. ε is z_m's weight w_m − 1 in the training loss
(1/N) Σ_m w_m L(z_m), which minibatches estimate (a batch's loss Σ_{i∈B} w_i ℓ_i / |B|, each
example in about |B|/N of the steps: the draw weights above); removing z_m takes w_m from 1 to 0,
so the derivative is already the change a removal makes, and the 1/N of r̄ is the mean loss's.
A short segment gives TracIn's −(x/N)∇fᵀ∇L and a long one approaches influence with damping
1/x, in the same unit (methods/influence.py; N = len(train_y)). tests/test_score_units.py checks
the unit against leave-one-out retraining.

Self-influence is the score of z_m for the query "z_m's own loss falls": the same recursion with
f = −L(z_m), so v_L = ∇L(z_m; θ_T) and the sign flips: +(1/N) Σ_ℓ v_ℓᵀ r(H̄_ℓ) ḡ_ℓ(z_m), how much
z_m's own loss would rise if it were removed (loss units). In segment
L's basis v_L is rank one, but S̄_L v_L is not: each earlier segment costs one dense change of
basis per example and layer, d_out·d_in·(d_out + d_in) multiply-adds (about 0.1 G for a
784-128 Linear layer), which dominates self-influence for L > 1.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..errors import SettingsError
from ..numerics.curvature import (
    FISHERS,
    LayerBasis,
    LayerMatrices,
    Scratch,
    balancing_scales,
    basis_change,
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
    rotated_gradients,
    rotated_query_gradients,
    sandwich,
    scoring_projector,
    stream_rotated_products,
)
from ..numerics.inputs import AttributionInputs, Segment, TrainState, state_tensor
from ..numerics.projection import KroneckerProjector
from ..numerics.segments import SegmentPlan, plan_segments
from ..progress import Progress, n_chunks
from ..runs.run import Run
from ..validation import check_settings
from .base import Method
from .kronecker_settings import fisher_field, k_field, kronecker_block_field, query_batch_size_field, seed_field

EigenFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SourceSettings:
    """Every knob of SOURCE."""

    n_segments: int = field(default=3, metadata={"help": (
        "segments L the checkpoints are split into, evenly within each training stage (ignored when segments is given)")})
    segments: list[tuple[int, int]] | None = field(default=None, metadata={"help": (
        "explicit half-open checkpoint index ranges [(lo, hi), ...] tiling all checkpoints in order, none crossing a stage; None: the even "
        "split")})
    fisher: str = fisher_field()
    seed: int = seed_field()
    query_batch_size: int | None = query_batch_size_field(
        "queries propagated per pass over the training set (memory: about 3 × this × tracked parameters)")
    k: int | None = k_field("each block of queries streams the training set once per segment", "each segment's rotated mean training "
                            "gradients and scoring is one product per segment (LoGra-style, approximate)")
    kronecker_block: int = kronecker_block_field()

    def __post_init__(self) -> None:
        check_settings(
            self,
            k=self.k is None or self.k >= 1,
            kronecker_block=self.kronecker_block >= 0,
            n_segments=self.n_segments >= 1,
            segments=self.segments is None or (len(self.segments) >= 1 and all(len(pair) == 2 for pair in self.segments)),
            fisher=self.fisher in FISHERS,
            query_batch_size=self.query_batch_size is None or self.query_batch_size >= 1,
        )

    @property
    def expected_segments(self) -> int:
        """How many segments these settings ask for."""
        return len(self.segments) if self.segments is not None else self.n_segments


def r_factor(lr_sum: float) -> EigenFunction:
    """r(σ) = (1 − e^{−xσ})/σ, computed as −expm1(−xσ)/σ, with its limit x at σ = 0."""

    def function(eigenvalues: torch.Tensor) -> torch.Tensor:
        positive = eigenvalues > 0
        safe = torch.where(positive, eigenvalues, torch.ones_like(eigenvalues))
        return torch.where(positive, -torch.expm1(-lr_sum * safe) / safe, torch.full_like(eigenvalues, lr_sum))

    return function


def decay_factor(lr_sum: float) -> EigenFunction:
    """S(σ) = e^{−xσ}: how a segment's steps shrink an earlier perturbation along eigenvalue σ."""
    return lambda eigenvalues: torch.exp(-lr_sum * eigenvalues)


def build_segments(plans: Sequence[SegmentPlan], models: Sequence[nn.Module]) -> list[Segment]:
    """AttributionInputs.segments from planned segments and the models at the planned checkpoints (in plan index order)."""
    return [Segment([models[index] for index in plan.checkpoint_indices], plan.lr_sum) for plan in plans]


@dataclass
class SegmentOperators:
    """A fitted segment in its own eigenbasis, per layer: the basis, r(Λ) and e^{−xΛ} (d_out, d_in).

    into_previous: per layer (left, right) taking coordinates in this segment's basis to the
    previous segment's (curvature.basis_change); empty for the first segment.
    """

    bases: dict[str, LayerBasis]
    r: LayerMatrices
    decay: LayerMatrices
    into_previous: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _segment_weights(vectors: LayerMatrices, operators: list[SegmentOperators]) -> Iterator[tuple[int, LayerMatrices]]:
    """For ℓ = L..1, (ℓ, r(H̄_ℓ) v_ℓ) in segment ℓ's rotated coordinates: the query-side recursion.

    vectors: v_L (n, d_out, d_in) per layer, rotated into segment L's basis; v_ℓ₋₁ = S̄_ℓ v_ℓ.
    """
    for index in reversed(range(len(operators))):
        segment = operators[index]
        yield index, {name: values * segment.r[name] for name, values in vectors.items()}
        if index > 0:
            vectors = {
                name: sandwich(segment.into_previous[name][0], values * segment.decay[name], segment.into_previous[name][1])
                for name, values in vectors.items()
            }


def _weighted_rows(features: torch.Tensor, segment: Segment) -> torch.Tensor:
    """(N, k) training-side features, row m times the segment's draw weight of example m."""
    return features if segment.weights is None else features * segment.weights.to(features)[:, None]


def _weighted_columns(products: torch.Tensor, segment: Segment) -> torch.Tensor:
    """(Q, N) products with training examples, column m times the segment's draw weight of example m."""
    return products if segment.weights is None else products * segment.weights.to(products)[None, :]


class Source(Method):
    """SOURCE scores and their per-segment contributions (see the module docstring)."""

    name = "source"
    label = "SOURCE"
    Settings = SourceSettings
    checkpoint_policy = "all"
    has_self_influence = True
    has_segments = True

    def prepare_inputs(self, inputs: AttributionInputs, run: Run, checkpoints: list[int]) -> tuple[AttributionInputs, list[str]]:
        """The inputs with SOURCE's segments over the chosen checkpoints, η̄K read from the run's trajectory."""
        infos = [run.checkpoints[index] for index in checkpoints]
        split = plan_segments(
            [info.step for info in infos],
            [info.stage for info in infos],
            np.asarray(run.trajectory.lr),
            np.asarray(run.trajectory.momentum),
            list(run.trajectory.optimizer),
            n_segments=self.settings.n_segments,
            ranges=None if self.settings.segments is None else [tuple(pair) for pair in self.settings.segments],
        )
        segments = build_segments(split.segments, inputs.models)
        for plan, segment in zip(split.segments, segments):  # an example counts in a segment as often as its batches held it
            segment.weights = torch.as_tensor(run.draw_weights(plan.first_step, plan.last_step), dtype=torch.float32)
        return replace(inputs, segments=segments), list(split.notes)

    def _segments(self, inputs: AttributionInputs) -> list[Segment]:
        segments = inputs.segments
        if not segments:
            raise SettingsError("SOURCE needs inputs.segments (Source.prepare_inputs plans them from a run; "
                                "by hand: segments.plan_segments and build_segments)")
        if len(segments) != self.settings.expected_segments:
            raise SettingsError(
                f"inputs hold {len(segments)} segments but the settings ask for {self.settings.expected_segments}: "
                "plan the segments with these settings"
            )
        if any(not segment.models or segment.lr_sum < 0 for segment in segments):
            raise SettingsError("every segment needs at least one checkpoint and lr_sum >= 0")
        return segments

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """Per segment ℓ: 'segment{ℓ}/{layer}/…' bases and averaged eigenvalues, 'segment{ℓ}/lr_sum' (1,)."""
        s, segments = self.settings, self._segments(inputs)
        projector = self._projector(inputs)
        n_passes = (2 + (projector is not None)) * sum(len(segment.models) for segment in segments)
        progress = Progress(inputs.progress, n_passes * local_chunks(inputs))
        state: TrainState = {}
        for index, segment in enumerate(segments):
            covariances = fit_covariances(segment.models, inputs, fisher=s.fisher, key=(s.seed, index), weights=segment.weights,
                                          on_chunk=progress.step)
            bases = eigenbasis(covariances)
            eigenvalues: LayerMatrices = {}
            for c, model in enumerate(segment.models):  # key (seed, ℓ, c): the covariance pass's labels
                fitted = fit_corrected_eigenvalues(model, bases, inputs, fisher=s.fisher, key=(s.seed, index, c), weights=segment.weights,
                                                   on_chunk=progress.step)
                eigenvalues = {name: values + eigenvalues.get(name, 0) for name, values in fitted.items()}
            averaged = {name: (total / len(segment.models)).clamp_min(0) for name, total in eigenvalues.items()}
            state.update(basis_state(bases, averaged, prefix=f"segment{index}/"))
            state[f"segment{index}/lr_sum"] = torch.tensor([segment.lr_sum], dtype=torch.float64)
            if projector is not None:
                scales = balancing_scales({name: r_factor(segment.lr_sum)(values) for name, values in averaged.items()})
                features = projected_train_gradients(segment.models, bases, scales, inputs, projector, progress.step)
                state[f"segment{index}/train_features"] = _weighted_rows(features, segment).cpu()
        return state

    def _projector(self, inputs: AttributionInputs) -> KroneckerProjector | None:
        s = self.settings
        return scoring_projector(s.k, s.kronecker_block, s.seed, inputs.models[-1], inputs.task)

    def _load(self, state: TrainState, inputs: AttributionInputs) -> list[SegmentOperators]:
        """Per segment, its operators from the state, checked against the inputs' lr_sum."""
        segments = self._segments(inputs)
        names = list(inputs.task.tracked_modules(segments[-1].models[-1]))
        operators: list[SegmentOperators] = []
        for index, segment in enumerate(segments):
            bases, eigenvalues = load_basis(state, names, inputs.device, prefix=f"segment{index}/")
            lr_sum = state[f"segment{index}/lr_sum"].item()
            if not math.isclose(lr_sum, segment.lr_sum, rel_tol=1e-9):
                raise SettingsError(f"segment {index}: state fitted with lr_sum {lr_sum}, inputs give {segment.lr_sum}: fit again")
            into_previous = {name: basis_change(bases[name], operators[-1].bases[name]) for name in names} if operators else {}
            r, decay = r_factor(lr_sum), decay_factor(lr_sum)
            operators.append(SegmentOperators(
                bases, {name: r(values) for name, values in eigenvalues.items()},
                {name: decay(values) for name, values in eigenvalues.items()}, into_previous,
            ))
        return operators

    def score_segments(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Per-segment contributions (n_segments, n_queries, n_train), oldest segment first, in the scores' unit; they sum to `score`."""
        segments, operators = self._segments(inputs), self._load(state, inputs)
        final_model, n_train = segments[-1].models[-1], len(inputs.train_y)
        projector = self._projector(inputs)
        if projector is not None:
            features = [check_projected_features(state_tensor(state, f"segment{index}/train_features", inputs.device), projector)
                        for index in range(len(segments))]
            scales = [balancing_scales(segment.r) for segment in operators]
        block_size = query_block_size(self.settings.query_batch_size, operators[-1].bases)
        passes_per_block = 1 + (0 if projector is not None else len(segments) * n_chunks(n_train, inputs.batch_size))
        progress = Progress(inputs.progress, n_chunks(len(query_y), block_size) * passes_per_block)
        contributions = torch.zeros(len(segments), len(query_y), n_train)
        for start in range(0, len(query_y), block_size):
            vectors = rotated_query_gradients(
                final_model, operators[-1].bases, inputs.task, query_x[start : start + block_size], query_y[start : start + block_size],
                batch_size=inputs.batch_size, device=inputs.device,
            )
            progress.step()
            for index, weighted in _segment_weights(vectors, operators):
                if projector is not None:
                    products = projected_query_vectors(projector, weighted, scales[index]) @ features[index].T
                else:
                    products = _weighted_columns(
                        stream_rotated_products(segments[index].models, operators[index].bases, inputs, weighted, progress.step),
                        segments[index])
                contributions[index, start : start + block_size] = -products.cpu() / n_train
        return contributions

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train): the change of each query's measurement from training with each example, positive =
        proponent; the sum of the segments' contributions."""
        return self.score_segments(state, inputs, query_x, query_y).sum(dim=0)

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """+(1/N) Σ_ℓ v_ℓᵀ r(H̄_ℓ) ḡ_ℓ(z_m) with v_L = ∇L(z_m; θ_T) (n_train,): the score for 'z_m's loss falls'."""
        segments, operators = self._segments(inputs), self._load(state, inputs)
        models = list({id(model): model for segment in segments for model in segment.models}.values())
        position = {id(model): index for index, model in enumerate(models)}
        final, n_train = position[id(segments[-1].models[-1])], len(inputs.train_y)
        progress = Progress(inputs.progress, n_chunks(n_train, inputs.batch_size))
        result, scratch = torch.zeros(n_train, device=inputs.device), Scratch()
        for rows, name, layers in layer_slices(models, inputs.task, "loss", inputs.model_batches(models), progress.step):
            own = {name: rotated_gradients([layers[final]], operators[-1].bases[name], scratch, "own")}  # v_L = ∇L(z_m; θ_T)
            for index, weighted in _segment_weights(own, operators):
                checkpoints = [layers[position[id(model)]] for model in segments[index].models]
                mean_gradients = rotated_gradients(checkpoints, operators[index].bases[name], scratch, "mean")
                terms = torch.einsum("bp,bp->b", weighted[name].flatten(1), mean_gradients.flatten(1)) / n_train
                result[rows] += terms if segments[index].weights is None else terms * segments[index].weights[rows].to(terms)
        return result.cpu()

