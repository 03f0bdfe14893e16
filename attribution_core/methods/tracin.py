"""TracIn (Pruthi et al. 2020): learning-rate-weighted gradient dot products over checkpoints.

    τ(z_q, z_m) = −Σ_c η_c ∇θ f(z_q; θ_c)ᵀ ∇θ L(z_m; θ_c)      (positive = proponent)
with f the measurement and L the training loss. Dot products come from the layer structure
(numerics/gradients.py): per layer, ∇f(q)ᵀ∇L(m) = Σ_{t,t'} (g_q,t · g_m,t')(a_q,t · a_m,t'), which for a
Linear layer on 2-D inputs is (g_q · g_m)(a_q · a_m) with no per-example gradient; where the
positions make that dearer than forming the layer's per-example gradients (convolutions), those
are formed for one chunk at a time.

Two modes (TracInSettings.k): exact (None), where `fit` stores only self-influence and
`score` streams the training set once per checkpoint; or projected (k), where `fit` stores
η_c Pᵀ∇L(z_m; θ_c) (N, k) per checkpoint (Kronecker projection, numerics/projection.py) and `score` costs
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
from ..numerics.gradients import LayerBatch, layer_batches
from ..numerics.inputs import AttributionInputs, TrainState, batches, state_tensor
from ..numerics.projected_gradients import project_gradients
from ..numerics.projection import DISTRIBUTIONS, Projector, make_projector, tracked_layer_shapes
from ..progress import Progress, n_chunks
from ..validation import check_settings
from .base import Method


@dataclass
class TracInSettings:
    """Every knob of TracIn (and of the gradient dot / cosine baselines)."""

    state_version: ClassVar[int] = 3
    """Part of the stored state's key: bumped when the same settings give other features (2: Kronecker block shapes, 3: feature order)."""

    k: int | None = field(default=None, metadata={"help": (
        "projected dimension; None: exact dot products (scoring streams the training set); k: store k-dim Kronecker-projected train "
        "gradients")})
    projection_kind: str = field(default="rademacher", metadata={"help": "random entries of the projection: rademacher (±1) or gaussian"})
    kronecker_block: int = field(default=1, metadata={"help": (
        "features per P_out ⊗ P_in block; 1 = independent rank-one features, 0 = one block per layer")})
    seed: int = field(default=0, metadata={"help": "seed of the random projection"})

    def __post_init__(self) -> None:
        check_settings(
            self,
            k=self.k is None or self.k >= 1,
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
    for train_start, train_layers in layer_batches(model, inputs.task, "loss", inputs.train_batches(model=model)):
        for query_start, layers in query_layers:
            block = layer_dot_products(layers, train_layers)
            dots[query_start : query_start + block.shape[0], train_start : train_start + block.shape[1]] = block
        progress.step()
    return dots


def weighted_checkpoints(inputs: AttributionInputs) -> list[tuple[nn.Module, torch.Tensor | float]]:
    """(model, η_c w_c) pairs: the checkpoint's learning rate, times each example's draw weight (N,) where the inputs have them."""
    if len(inputs.checkpoint_lrs) != len(inputs.models):
        raise SettingsError(
            f"{len(inputs.models)} checkpoints but {len(inputs.checkpoint_lrs)} learning rates: give one η_c per checkpoint"
        )
    weights = [inputs.train_weights(model) for model in inputs.models]
    return [(model, lr if w is None else lr * w.to(inputs.device)) for model, lr, w in zip(inputs.models, inputs.checkpoint_lrs, weights)]


def _rows_of(weight: torch.Tensor | float, start: int, stop: int) -> torch.Tensor | float:
    """A per-example weight's rows start..stop (as a column for (rows, k) features); a scalar as it is."""
    return weight[start:stop] if isinstance(weight, torch.Tensor) else weight


class TracIn(Method):
    """TracIn scores: −Σ_c η_c w_c,m ∇f(z_q; θ_c)ᵀ ∇L(z_m; θ_c) over the checkpoints.

    w_c,m (inputs.weights, from the run's record) is how much example m was trained on in the
    stretch of training before checkpoint c, mean 1 (1 for all without a record of the batches):
    an example the stretch never drew contributes nothing there. Gradients at θ_c are taken on
    the inputs as c's stage saw them (inputs.views).
    """

    name = "tracin"
    label = "TracIn"
    estimates_removal = False  # a similarity: it ranks examples, its scale is not a change of the margin
    Settings = TracInSettings
    checkpoint_policy = "all"
    has_self_influence = True
    self_influence_at_fit = True

    def _projector(self, inputs: AttributionInputs) -> Projector | None:
        s = self.settings
        if s.k is None:
            return None
        shapes = tracked_layer_shapes(inputs.models[-1], inputs.task)
        return make_projector("kronecker", shapes, s.k, seed=s.seed, kind=s.projection_kind, block=s.kronecker_block)

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """'self_influence' (N,); projected mode also 'train_features_{c}' = η_c w_c Pᵀ∇L (N, k) per checkpoint."""
        projector = self._projector(inputs)
        progress = Progress(inputs.progress, len(inputs.models) * n_chunks(len(inputs.train_y), inputs.batch_size))
        state: TrainState = {}
        self_influence = torch.zeros(len(inputs.train_y), device=inputs.device)
        for c, (model, lr) in enumerate(weighted_checkpoints(inputs)):
            features = None if projector is None else torch.empty(len(inputs.train_y), projector.k, device=inputs.device)
            for start, layers in layer_batches(model, inputs.task, "loss", inputs.train_batches(model=model)):
                norms = squared_norms(layers)
                rows_lr = _rows_of(lr, start, start + len(norms))
                self_influence[start : start + len(norms)] += rows_lr * norms
                if features is not None:
                    projected = projector.project(layers, out=features[start : start + len(norms)])
                    projected.mul_(rows_lr[:, None] if isinstance(rows_lr, torch.Tensor) else rows_lr)
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
        progress = Progress(inputs.progress, len(inputs.models) * steps_per_checkpoint)
        scores = torch.zeros(len(query_y), len(inputs.train_y), device=inputs.device)
        for c, (model, lr) in enumerate(weighted_checkpoints(inputs)):
            if projector is None:
                scores -= exact_dot_products(model, inputs, query_x, query_y, progress) * lr
            else:
                train_features = state_tensor(state, f"train_features_{c}", inputs.device)
                queries = batches(query_x, query_y, inputs.batch_size, inputs.device)
                query_features = project_gradients(model, inputs.task, projector, "measurement", queries, len(query_y), progress.step)
                scores -= query_features @ train_features.T
        return scores.cpu()

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """Σ_c η_c w_c,m ‖∇L(z_m; θ_c)‖² (n_train,), a positive magnitude."""
        return state["self_influence"]
