"""TracIn (Pruthi et al. 2020): learning-rate-weighted gradient dot products over checkpoints.

    τ(z_q, z_m) = −Σ_c η_c ∇θ f(z_q; θ_c)ᵀ ∇θ L(z_m; θ_c)      (positive = proponent)
with f the measurement and L the training loss. Dot products come from the layer structure
(gradients.py): per layer, ∇f(q)ᵀ∇L(m) = Σ_{t,t'} (g_q,t · g_m,t')(a_q,t · a_m,t'), which for a
Linear layer on 2-D inputs is (g_q · g_m)(a_q · a_m) with no per-example gradient; where the
positions make that dearer than forming the layer's per-example gradients (convolutions), those
are formed for one chunk at a time.

Two modes (TracInSettings.projection): exact (None), where `fit` stores only self-influence and
`score` streams the training set once per checkpoint; or projected (k), where `fit` stores
η_c Pᵀ∇L(z_m; θ_c) (N, k) per checkpoint (Kronecker projection, projection.py) and `score` costs
the queries' gradients and a product.

Self-influence is reported as a positive magnitude, Σ_c η_c ‖∇L(z_m; θ_c)‖² (loss gradient on
both sides, always exact), which ranks examples that pull hard on the parameters (mislabels).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import SettingsError
from ..gradients import LayerBatch
from ..projection import (
    DISTRIBUTIONS,
    Progress,
    Projector,
    batches,
    check_settings,
    layer_batches,
    make_projector,
    n_chunks,
    project_gradients,
    state_tensor,
    tracked_layer_shapes,
)
from .base import AttributionInputs, TrainState


@dataclass
class TracInSettings:
    """Every knob of TracIn (and of the gradient dot / cosine baselines)."""

    state_version: ClassVar[int] = 3
    """Part of the stored state's key: bumped when the same settings give other features (2: Kronecker block shapes, 3: feature order)."""

    projection: int | None = field(default=None, metadata={"help": "None: exact dot products (scoring streams the training set); k: store k-dim Kronecker-projected train gradients"})
    projection_kind: str = field(default="rademacher", metadata={"help": "random entries of the projection: rademacher (±1) or gaussian"})
    kronecker_block: int = field(default=1, metadata={"help": "features per P_out ⊗ P_in block; 1 = independent rank-one features, 0 = one block per layer"})
    seed: int = field(default=0, metadata={"help": "seed of the random projection"})

    def __post_init__(self) -> None:
        check_settings(
            self,
            projection=self.projection is None or self.projection >= 1,
            projection_kind=self.projection_kind in DISTRIBUTIONS,
            kronecker_block=self.kronecker_block >= 0,
        )


def _factored_is_cheaper(positions_q: int, positions_m: int, d_out: int, d_in: int) -> bool:
    """Whether Σ_{t,t'} (g·g')(a·a') costs less than a dot of (d_out x d_in) per-example gradients."""
    return positions_q * positions_m * (d_out + d_in) <= d_out * d_in


def _layer_dot_products(query: LayerBatch, train: LayerBatch) -> torch.Tensor:
    d_out, d_in = query.output_grads.shape[-1], query.inputs.shape[-1]
    if _factored_is_cheaper(query.inputs.shape[1], train.inputs.shape[1], d_out, d_in):
        grad_dots = torch.einsum("qto,mso->qmts", query.output_grads, train.output_grads)
        input_dots = torch.einsum("qti,msi->qmts", query.inputs, train.inputs)
        return (grad_dots * input_dots).sum(dim=(2, 3))
    return query.per_example_gradients().flatten(1) @ train.per_example_gradients().flatten(1).T


def layer_dot_products(query_layers: list[LayerBatch], train_layers: list[LayerBatch]) -> torch.Tensor:
    """Gradient dot products (n_query, n_train) summed over the tracked layers."""
    return sum(_layer_dot_products(query, train) for query, train in zip(query_layers, train_layers))


def _layer_squared_norms(layer: LayerBatch) -> torch.Tensor:
    positions, d_out, d_in = layer.inputs.shape[1], layer.output_grads.shape[-1], layer.inputs.shape[-1]
    if _factored_is_cheaper(positions, positions, d_out, d_in):
        grad_dots = torch.einsum("bto,bso->bts", layer.output_grads, layer.output_grads)
        input_dots = torch.einsum("bti,bsi->bts", layer.inputs, layer.inputs)
        return (grad_dots * input_dots).sum(dim=(1, 2))
    return layer.per_example_gradients().square().sum(dim=(1, 2))


def squared_norms(layers: list[LayerBatch]) -> torch.Tensor:
    """‖∇θ‖² per example (B,) over the tracked layers."""
    return sum(_layer_squared_norms(layer) for layer in layers)


def exact_dot_products(
    model: nn.Module, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor, progress: Progress
) -> torch.Tensor:
    """∇f(z_q)ᵀ∇L(z_m) (n_queries, n_train) at one checkpoint, streaming the training set once."""
    query_layers = []
    for start, layers in layer_batches(model, inputs.task, "measurement", batches(query_x, query_y, inputs.batch_size, inputs.device)):
        query_layers.append((start, layers))
        progress.step()
    dots = torch.zeros(len(query_y), len(inputs.train_y), device=inputs.device)
    for train_start, train_layers in layer_batches(model, inputs.task, "loss", inputs.train_batches()):
        for query_start, layers in query_layers:
            block = layer_dot_products(layers, train_layers)
            dots[query_start : query_start + block.shape[0], train_start : train_start + block.shape[1]] = block
        progress.step()
    return dots


def weighted_checkpoints(inputs: AttributionInputs) -> list[tuple[nn.Module, float]]:
    """(model, η_c) pairs; the learning rates must match the checkpoints one to one."""
    if len(inputs.checkpoint_lrs) != len(inputs.checkpoints):
        raise SettingsError(
            f"{len(inputs.checkpoints)} checkpoints but {len(inputs.checkpoint_lrs)} learning rates: give one η_c per checkpoint"
        )
    return list(zip(inputs.checkpoints, inputs.checkpoint_lrs))


class TracIn:
    """TracIn scores: −Σ_c η_c ∇f(z_q; θ_c)ᵀ ∇L(z_m; θ_c) over the checkpoints."""

    name: ClassVar[str] = "tracin"

    def __init__(self, settings: TracInSettings | None = None):
        self.settings = settings or TracInSettings()

    def _projector(self, inputs: AttributionInputs) -> Projector | None:
        s = self.settings
        if s.projection is None:
            return None
        shapes = tracked_layer_shapes(inputs.checkpoints[-1], inputs.task)
        return make_projector("kronecker", shapes, s.projection, seed=s.seed, kind=s.projection_kind, block=s.kronecker_block)

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """'self_influence' (N,); projected mode also 'train_features_{c}' = η_c Pᵀ∇L (N, k) per checkpoint."""
        projector = self._projector(inputs)
        progress = Progress(inputs.progress, len(inputs.checkpoints) * n_chunks(len(inputs.train_y), inputs.batch_size))
        state: TrainState = {}
        self_influence = torch.zeros(len(inputs.train_y), device=inputs.device)
        for c, (model, lr) in enumerate(weighted_checkpoints(inputs)):
            features = None if projector is None else torch.empty(len(inputs.train_y), projector.k, device=inputs.device)
            for start, layers in layer_batches(model, inputs.task, "loss", inputs.train_batches()):
                norms = squared_norms(layers)
                self_influence[start : start + len(norms)] += lr * norms
                if features is not None:
                    projector.project(layers, out=features[start : start + len(norms)]).mul_(lr)
                progress.step()
            if features is not None:
                state[f"train_features_{c}"] = features.cpu()
        state["self_influence"] = self_influence.cpu()
        return state

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train), positive = proponent."""
        projector = self._projector(inputs)
        steps_per_checkpoint = n_chunks(len(query_y), inputs.batch_size)
        if projector is None:
            steps_per_checkpoint += n_chunks(len(inputs.train_y), inputs.batch_size)
        progress = Progress(inputs.progress, len(inputs.checkpoints) * steps_per_checkpoint)
        scores = torch.zeros(len(query_y), len(inputs.train_y), device=inputs.device)
        for c, (model, lr) in enumerate(weighted_checkpoints(inputs)):
            if projector is None:
                scores -= lr * exact_dot_products(model, inputs, query_x, query_y, progress)
            else:
                train_features = state_tensor(state, f"train_features_{c}", inputs.device)
                queries = batches(query_x, query_y, inputs.batch_size, inputs.device)
                scores -= project_gradients(model, inputs.task, projector, "measurement", queries, len(query_y), progress.step) @ train_features.T
        return scores.cpu()

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """Σ_c η_c ‖∇L(z_m; θ_c)‖² (n_train,), a positive magnitude."""
        return state["self_influence"]
