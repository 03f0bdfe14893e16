"""The setting the score-unit tests share (a plain module): an L2-regularised softmax regression taught by a random teacher.

Its sizes and training constants, the teacher's data, and the regression's logits and module form; test_score_units.py
checks every removal-estimating method's unit on it, test_cleaning_units.py a cleaning plan's predicted effect.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_TRAIN, N_QUERIES, D_IN, N_CLASSES = 200, 6, 3, 3
TEACHER_SCALE = 1.0
"""Labels drawn from softmax(x @ teacher), teacher entries N(0, TEACHER_SCALE²): learnable, with noisy labels."""
WEIGHT_DECAY, LR, STEPS, N_CHECKPOINTS = 0.01, 4.0, 150, 6
"""Weight decay small beside the loss's curvature (whose smallest nonzero eigenvalue is about 0.02 here), which
SOURCE and TRAK do not see; 150 steps of lr 4 converge every regression to a gradient below 1e-8."""


def teacher_data(generator: torch.Generator, teacher: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs (n, D_IN) float64 and labels (n,) drawn from softmax(x @ teacher)."""
    x = torch.randn(n, D_IN, generator=generator, dtype=torch.float64)
    return x, torch.multinomial(torch.softmax(x @ teacher, dim=1), 1, generator=generator).squeeze(1)


def logits(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Softmax-regression logits (M, n, K) of M weight matrices [W | b] (M, K, D + 1) on inputs (n, D)."""
    return F.pad(x, (0, 1), value=1.0) @ weights.transpose(-1, -2)


def as_module(weights: torch.Tensor) -> nn.Module:
    """One weight matrix [W | b] (K, D + 1) as a float32 nn.Linear model in eval mode."""
    model = nn.Sequential(nn.Linear(D_IN, N_CLASSES))
    with torch.no_grad():
        model[0].weight.copy_(weights[:, :D_IN])
        model[0].bias.copy_(weights[:, D_IN])
    return model.eval()
