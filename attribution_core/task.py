"""The one extension point: what is trained, what is measured, and which layers are tracked.

Everything model-specific in the core goes through a Task: the per-example training loss, the
measurement a score explains, the predictive distribution (true-Fisher labels, predictions),
TRAK's residual weights, the tracked layers and the representation layer. `Task.key()` names
the task in every stored result's key, so two tasks never share a stored result.
"""
from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn import functional as F

from .errors import SettingsError

TRACKABLE_TYPES = (nn.Linear, nn.Conv2d)


def correct_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin logit_y - logsumexp_{j != y} logit_j: (B, K), (B,) -> (B,)."""
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Labels (B,) drawn from softmax(logits) (B, K) by inverse CDF of the given uniforms (B,)."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    labels = torch.searchsorted(cdf, uniforms.to(cdf.device)[:, None]).squeeze(1)
    return labels.clamp_max(logits.shape[1] - 1)  # a uniform above a rounded-down total


class Task:
    """Classification task: mean cross-entropy training loss, correct-class margin measurement.

    Subclass and override any method to attribute another loss or measurement; the core calls
    nothing else model-specific. Override `key` too when two instances of a subclass differ in
    something their attributes do not show.
    """

    def key(self) -> str:
        """The task's identity in stored keys: its class and its attributes."""
        cls = type(self)
        return json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}", "attributes": vars(self)}, sort_keys=True, default=repr)

    def train_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example training loss, shape (B,)."""
        return F.cross_entropy(model(x), y, reduction="none")

    def measurement(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example measurement f(z; theta), shape (B,); higher means more of the query's class."""
        return correct_class_margin(model(x), y)

    def predictions(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's predictive distribution over classes, (B, K) probabilities."""
        return torch.softmax(model(x), dim=1)

    def sample_targets(self, model: nn.Module, x: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Targets (B,) drawn from the model's predictive distribution (true Fisher) by the given uniforms (B,)."""
        return sample_labels(model(x), uniforms)

    def residual_weights(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """TRAK's Q_ii (B,): how hard the loss still pulls on the measurement, 1 − p(label) for cross-entropy."""
        return 1 - torch.exp(-self.train_loss(model, x, y))

    def tracked_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights are attributed: every nn.Linear and nn.Conv2d by default."""
        return {name: module for name, module in model.named_modules() if isinstance(module, TRACKABLE_TYPES)}

    def representation_layer(self, model: nn.Module) -> nn.Module:
        """The layer whose inputs are an example's representation: the last tracked nn.Linear (the classifier head)."""
        modules = self.tracked_modules(model)
        linear = [module for module in modules.values() if isinstance(module, nn.Linear)]
        if not linear:
            raise SettingsError(f"no tracked nn.Linear layer to read representations from (tracked: {list(modules)})")
        return linear[-1]
