"""Tiny models, data and reference computations shared by the method tests (a plain module).

The references here are written independently of the core: per-example gradients by a loop of
torch.autograd.grad, laid out as the core's [W.reshape(d_out, -1) | b] per tracked layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from attribution_core.errors import SettingsError
from attribution_core.methods.exact import flat_gradients, gauss_newton_matrix
from attribution_core.methods.source import decay_factor, r_factor
from attribution_core.numerics.inputs import AttributionInputs
from attribution_core.numerics.linalg import damped_inverse
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


def closed_form_trak(models, train_x, train_y, query_x, query_y, damping_ratio: float, use_q: bool) -> torch.Tensor:
    """mean_s φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ Φᵀ Q / r̄ with φ the (unprojected) measurement gradients, in float64.

    r̄ = Σ_s Σ_i p_i(1 − p_i) ‖φ_i‖² / Σ_s Σ_i ‖φ_i‖², over all checkpoints s (p_i: probability of the label).
    """
    scores, weighted_norms, norms = [], 0, 0
    for model in models:
        phi = loop_gradients(model, train_x, train_y, "measurement").double()
        phi_query = loop_gradients(model, query_x, query_y, "measurement").double()
        gram = phi.T @ phi
        damping = damping_ratio * gram.diagonal().mean()
        p = label_probabilities(model, train_x, train_y).double()
        q = 1 - p if use_q else torch.ones(len(train_y), dtype=torch.float64)
        scores.append(phi_query @ torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=torch.float64), phi.T * q))
        weighted_norms += (p * (1 - p) * phi.square().sum(dim=1)).sum()
        norms += phi.square().sum()
    return (torch.stack(scores).mean(0) * norms / weighted_norms).float()


N_CLASSES = 3


class LossFallsTask(Task):
    """Measurement f = −L: the score of z_m for the query z_m then equals its self-influence."""

    def measurement(self, model, x, y):
        return -self.train_loss(model, x, y)


def make_inputs(models, train_x, train_y, *, task=None, batch_size=256, segments=None) -> AttributionInputs:
    """AttributionInputs over the given checkpoints (oldest first) on the CPU."""
    return AttributionInputs(
        models=list(models),
        checkpoint_lrs=[1.0] * len(models),
        train_x=train_x,
        train_y=train_y,
        task=task or Task(),
        batch_size=batch_size,
        segments=segments,
    )


def shared_input_case(n_checkpoints: int = 1, n_per_class: int = 2, d: int = 4, seed: int = 0):
    """Float64 Linear(d, 3) checkpoints, train set of one shared input with balanced labels, 4 queries."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(d, generator=generator, dtype=torch.float64)
    models = []
    for _ in range(n_checkpoints):
        model = nn.Sequential(nn.Linear(d, N_CLASSES)).double().eval()
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(N_CLASSES, d, generator=generator, dtype=torch.float64))
            model[0].bias.copy_(0.3 - model[0].weight @ x0)  # equal logits at x0: uniform predictions
        models.append(model)
    train_x = x0.expand(n_per_class * N_CLASSES, d).clone()
    train_y = torch.arange(N_CLASSES).repeat(n_per_class)
    query_x = torch.randn(4, d, generator=generator, dtype=torch.float64)
    return models, train_x, train_y, query_x, torch.tensor([0, 1, 2, 1])


def shared_input_eigenvalue(train_x: torch.Tensor) -> float:
    """The one nonzero Gauss–Newton eigenvalue of the shared-input case: |a|²/K (a = [x0, 1])."""
    return (train_x[0].square().sum().item() + 1) / N_CLASSES


def mlp_trajectory(n_checkpoints: int = 4, steps_between: int = 5, n_train: int = 96, seed: int = 0):
    """Checkpoints (every steps_between full-batch SGD steps) of a 5-8-3 tanh MLP, train and query data."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n_train + 6, 5, generator=generator)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()) % N_CLASSES
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, N_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    checkpoints = []
    for _ in range(n_checkpoints):
        for _ in range(steps_between):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[:n_train]), y[:n_train]).backward()
            optimizer.step()
        checkpoints.append(copy.deepcopy(model).eval())
    return checkpoints, x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score arrays, flattened."""
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def exact_scores(inputs, query_x, query_y, damping: float) -> torch.Tensor:
    """−(1/N) ∇f(q)ᵀ(G + λI)⁻¹∇L(m) (n_queries, n_train) float64 with the explicit Gauss–Newton G at the last checkpoint."""
    model, task = inputs.models[-1], inputs.task
    inverse = damped_inverse(gauss_newton_matrix(model, task, inputs.train_x, inputs.train_y), damping)
    query_grads = flat_gradients(model, task, query_x, query_y, "measurement").double()
    train_grads = flat_gradients(model, task, inputs.train_x, inputs.train_y, "loss").double()
    return -query_grads @ inverse @ train_grads.T / len(inputs.train_y)
