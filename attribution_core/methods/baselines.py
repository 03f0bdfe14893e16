"""Cheap baselines, a floor for every other method (all at the final checkpoint, positive = proponent).

- Gradient dot: −∇f(z_q)ᵀ∇L(z_m), TracIn with the last checkpoint only and η = 1.
- Gradient cosine: the same, divided by ‖∇f(z_q)‖ ‖∇L(z_m)‖ (norms always exact).
- Representation similarity: cosine of penultimate-layer representations, taken as the inputs of the
  last tracked nn.Linear layer (or a named tracked layer) and captured by a forward hook.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import SettingsError
from ..numerics.gradients import layer_batches
from ..numerics.inputs import AttributionInputs, TrainState, batches, state_tensor
from ..progress import Progress, n_chunks
from ..task import Task
from ..validation import check_settings
from .base import Method
from .tracin import TracIn, TracInSettings, squared_norms


def final_checkpoint(inputs: AttributionInputs) -> AttributionInputs:
    """The inputs reduced to the last checkpoint (on its view of the inputs), with η = 1 and no draw weights."""
    return replace(inputs, models=inputs.models[-1:], checkpoint_lrs=[1.0], weights=None,
                   views=None if inputs.views is None else inputs.views[-1:])


def _divide_safely(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator (a product of norms) is 0."""
    return numerator / denominator.clamp_min(torch.finfo(numerator.dtype).tiny)


@dataclass
class GradientSimilaritySettings(TracInSettings):
    """Knobs of gradient dot and cosine: TracIn's (projection or exact), at the final checkpoint."""


class GradientDot(Method):
    """−∇f(z_q)ᵀ∇L(z_m) at the final checkpoint; self-influence ‖∇L(z_m)‖²."""

    name = "graddot"
    label = "gradient dot"
    estimates_removal = False  # a similarity: it ranks examples, its scale is not a change of the margin
    Settings = GradientSimilaritySettings
    has_self_influence = True
    self_influence_at_fit = True

    def __init__(self, settings: GradientSimilaritySettings | None = None):
        super().__init__(settings)
        self._tracin = TracIn(self.settings)

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """'self_influence' = ‖∇L(z_m)‖² (N,), plus projected train gradients in projected mode."""
        return self._tracin.fit(final_checkpoint(inputs))

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train), positive = proponent."""
        return self._tracin.score(state, final_checkpoint(inputs), query_x, query_y)

    def self_influence(self, state: TrainState, inputs: AttributionInputs) -> torch.Tensor:
        """‖∇L(z_m)‖² at the final checkpoint (n_train,)."""
        return state["self_influence"]


class GradientCosine(GradientDot):
    """−cos(∇f(z_q), ∇L(z_m)) at the final checkpoint."""

    name = "gradcos"
    label = "gradient cosine"
    estimates_removal = False  # a similarity: it ranks examples, its scale is not a change of the margin
    has_self_influence = self_influence_at_fit = False  # the cosine of an example's gradient with itself is 1: it ranks nothing
    self_influence = Method.self_influence  # not gradient dot's ‖∇L‖²

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Scores (n_queries, n_train) in [-1, 1], positive = proponent."""
        dots = super().score(state, inputs, query_x, query_y)
        query_norms = self._query_norms(inputs, query_x, query_y)
        train_norms = state_tensor(state, "self_influence", torch.device("cpu")).sqrt()
        return _divide_safely(dots, query_norms[:, None] * train_norms[None, :])

    def _query_norms(self, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """‖∇f(z_q)‖ at the final checkpoint (n_queries,) on the CPU."""
        chunks = batches(query_x, query_y, inputs.batch_size, inputs.device)
        norms = [squared_norms(layers) for _, layers in layer_batches(inputs.models[-1], inputs.task, "measurement", chunks)]
        return torch.cat(norms).sqrt().cpu()


@dataclass
class RepresentationSettings:
    """Knobs of representation similarity."""

    layer: str | None = field(default=None, metadata={"help": (
        "tracked layer whose inputs are the representation; None: the task's representation layer (the last tracked nn.Linear)")})

    def __post_init__(self) -> None:
        check_settings(self, layer=self.layer is None or bool(self.layer))


def representations(
    model: nn.Module,
    task: Task,
    module: nn.Module,
    chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    on_chunk: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """Inputs of `module` flattened per example, (n_examples, d), from a forward pass of the task's loss."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, args, _output: captured.append(args[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            for _, x, y in chunks:
                task.train_loss(model, x, y)
                on_chunk()
    finally:
        handle.remove()
    return torch.cat(captured).float()


class RepresentationSimilarity(Method):
    """Cosine similarity of penultimate-layer representations at the final checkpoint."""

    name = "repsim"
    label = "representation similarity"
    estimates_removal = False  # a similarity: it ranks examples, its scale is not a change of the margin
    quick = True  # a forward pass at the final checkpoint fits it; a block is one product
    Settings = RepresentationSettings

    def _module(self, model: nn.Module, task: Task) -> nn.Module:
        if self.settings.layer is None:
            return task.representation_layer(model)
        modules = task.tracked_modules(model)
        if self.settings.layer not in modules:
            raise SettingsError(f"layer={self.settings.layer!r} is not a tracked layer; tracked: {list(modules)}")
        return modules[self.settings.layer]

    def _unit_representations(self, inputs: AttributionInputs, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unit-norm representations (n, d) at the final checkpoint, on the device."""
        model = inputs.models[-1]
        progress = Progress(inputs.progress, n_chunks(len(y), inputs.batch_size))
        chunks = batches(x, y, inputs.batch_size, inputs.device)
        rows = representations(model, inputs.task, self._module(model, inputs.task), chunks, progress.step)
        return _divide_safely(rows, rows.norm(dim=1, keepdim=True))

    def fit(self, inputs: AttributionInputs) -> TrainState:
        """'train_features' (the stored state's name for them, kept so stored states still load): unit-norm train representations (N, d)."""
        return {"train_features": self._unit_representations(inputs, inputs.train_view(inputs.models[-1]), inputs.train_y).cpu()}

    def score(self, state: TrainState, inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (n_queries, n_train): similar examples count as proponents."""
        train_features = state_tensor(state, "train_features", inputs.device)
        return (self._unit_representations(inputs, query_x, query_y) @ train_features.T).cpu()

