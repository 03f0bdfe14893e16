"""Tiny models, data and reference computations shared by the method tests (a plain module).

The references here are written independently of the core: per-example gradients by a loop of
torch.autograd.grad, laid out as the core's [W.reshape(d_out, -1) | b] per tracked layer.
"""
from __future__ import annotations

import torch
from torch import nn

from attribution_core.errors import SettingsError
from attribution_core.methods.exact import flat_gradients, gauss_newton_matrix
from attribution_core.methods.source import decay_factor, r_factor
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.task import Task


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 5, n_classes: int = 3) -> nn.Module:
    """Flatten-Linear-ReLU-Linear in eval mode, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)).eval()


def cnn(seed: int = 0, channels: int = 2, n_classes: int = 3) -> nn.Module:
    """conv-relu-pool-flatten-linear on (channels, 6, 6) images, eval mode, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, n_classes),
    ).eval()


class TokenModel(nn.Module):
    """A Linear layer applied per position of (B, T, d) inputs, mean-pooled, then a classifier."""

    def __init__(self, d_in: int = 4, hidden: int = 5, n_classes: int = 3, bias: bool = True):
        super().__init__()
        self.encoder = nn.Linear(d_in, hidden, bias=bias)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.encoder(x)).mean(dim=1))


def token_model(seed: int = 0, bias: bool = True, d_in: int = 4, hidden: int = 5) -> nn.Module:
    """TokenModel in eval mode, seeded."""
    torch.manual_seed(seed)
    return TokenModel(d_in, hidden, bias=bias).eval()


def data(n: int, shape: tuple[int, ...], n_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs (n, *shape) and uniform labels (n,)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, n_classes, (n,), generator=generator)


def attribution_inputs(
    models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, *, lrs: list[float] | None = None, batch_size: int = 7, progress=None
) -> AttributionInputs:
    """AttributionInputs over the given checkpoints (learning rates 0.1, 0.2, ... unless given)."""
    extra = {"progress": progress} if progress is not None else {}
    return AttributionInputs(
        models=models,
        checkpoint_lrs=lrs if lrs is not None else [0.1 * (c + 1) for c in range(len(models))],
        train_x=x,
        train_y=y,
        batch_size=batch_size,
        **extra,
    )


def loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: str = "loss", task: Task | None = None) -> torch.Tensor:
    """Per-example gradients (B, P) of the task's loss or measurement, one autograd call per example."""
    task = task or Task()
    modules = list(task.tracked_modules(model).values())
    function = task.train_loss if objective == "loss" else task.measurement
    rows = []
    for i in range(len(y)):
        parameters = [p for module in modules for p in (module.weight, module.bias) if p is not None]
        grads = iter(torch.autograd.grad(function(model, x[i : i + 1], y[i : i + 1]).sum(), parameters))
        row = []
        for module in modules:
            weight_grad = next(grads)
            columns = [weight_grad.reshape(weight_grad.shape[0], -1)]
            if module.bias is not None:
                columns.append(next(grads)[:, None])
            row.append(torch.cat(columns, dim=1).flatten())
        rows.append(torch.cat(row))
    return torch.stack(rows).detach()


def label_probabilities(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each example's label (B,)."""
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).gather(1, y[:, None]).squeeze(1)


def exact_source_scores(
    inputs: AttributionInputs, query_x: torch.Tensor, query_y: torch.Tensor, curvature: str = "gauss_newton"
) -> torch.Tensor:
    """Reference SOURCE contributions (n_segments, n_queries, n_train) float64 with explicit matrices: small models only.

    H̄_ℓ is the mean over the segment's checkpoints of the Gauss–Newton matrix (P, P) of the
    segment's loss (1/N) Σ_m w_m L(z_m) (w: the segment's draw weights, 1 without), each model's
    on its own view of the inputs, eigendecomposed with negative eigenvalues clipped; gradients are
    explicit per example, and example m's contribution is w_m times the unweighted formula.
    curvature="empirical" uses the empirical Fisher (1/N) Σ_m w_m ∇L_m ∇L_mᵀ instead of the Gauss–Newton matrix.
    """
    segments, task = inputs.segments, inputs.task
    if not segments:
        raise SettingsError("exact SOURCE needs inputs.segments")
    n_train = len(inputs.train_y)
    vectors = flat_gradients(segments[-1].models[-1], task, query_x, query_y, "measurement").double()
    contributions = []
    for segment in reversed(segments):
        weights = torch.ones(n_train, dtype=torch.float64) if segment.weights is None else segment.weights.double()
        per_model = [flat_gradients(m, task, inputs.train_view(m), inputs.train_y, "loss").double() for m in segment.models]
        if curvature == "empirical":
            matrix = sum((weights[:, None] * g).T @ g for g in per_model) / n_train
        else:
            matrix = sum(weighted_gauss_newton(m, task, inputs.train_view(m), inputs.train_y, weights) for m in segment.models)
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix / len(segment.models))
        eigenvalues = eigenvalues.clamp_min(0)
        gradients = sum(per_model)
        mean_gradients = weights[:, None] * gradients / len(segment.models)
        rotated = vectors @ eigenvectors
        contributions.append(-((rotated * r_factor(segment.lr_sum)(eigenvalues)) @ eigenvectors.T) @ mean_gradients.T / n_train)
        vectors = (rotated * decay_factor(segment.lr_sum)(eigenvalues)) @ eigenvectors.T
    return torch.stack(contributions[::-1]).cpu()


def weighted_gauss_newton(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_m w_m G_m (P, P): the Gauss–Newton matrix of the w-weighted mean loss, one example at a time."""
    return sum(weights[m] * gauss_newton_matrix(model, task, x[m : m + 1], y[m : m + 1]) for m in range(len(y))) / len(y)
