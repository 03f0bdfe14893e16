"""The one extension point: what is trained, what is measured, and which layers are tracked."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TRACKABLE_TYPES = (nn.Linear, nn.Conv2d)


def correct_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin logit_y - logsumexp_{j != y} logit_j: (B, K), (B,) -> (B,)."""
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


class Task:
    """Classification task: mean cross-entropy training loss, correct-class margin measurement.

    Subclass and override any method to attribute another loss or measurement; every method
    of the core goes through these three calls and nothing else model-specific.
    """

    def train_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example training loss, shape (B,)."""
        return F.cross_entropy(model(x), y, reduction="none")

    def measurement(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example measurement f(z; theta), shape (B,); higher means more of the query's class."""
        return correct_class_margin(model(x), y)

    def tracked_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose weights are attributed: every nn.Linear and nn.Conv2d by default."""
        return {name: module for name, module in model.named_modules() if isinstance(module, TRACKABLE_TYPES)}
