"""What the replay benchmarks (B7, B8) share: how much a run's training amplifies rounding-size perturbations,
and whether replay predicts the order-keeping ground truth once rounding is out of the way (everything in float64)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attribution_core.evaluation.lds import GroundTruth, rowwise_spearman
from attribution_core.runs.replay_engine import ReplayPlan, metagradients, replay_forward, replay_plan
from attribution_core.runs.run import Run
from attribution_core.runs.threads import one_thread


@dataclass(frozen=True)
class Float64Check:
    """The order-keeping question asked again in float64: retrains (replays) of the ground truth's first subsets, and replay's scores.

    rounding_sensitivity: rms over (subset, query) of float64 − float32 (stored) margins, over the queries' mean std across
    subsets. Near 0: the ground truth is a smooth function of the example weights. A sizeable fraction: training amplifies
    perturbations of rounding size (ReLU kinks and max-pool choices flipped, then grown), and no first-order score can
    predict that part.
    lds: replay's float64 derivative against the float64 retrains (Spearman over the subsets, mean over the first
    n_lds_queries queries), or None when not asked. High: the float32 ground truth's noise was the obstacle. Low: the
    loop's response to removing the subset is not first order even without rounding, and no derivative, exact or not,
    predicts it.
    """

    rounding_sensitivity: float
    lds: float | None
    n_subsets: int
    n_lds_queries: int


def float64_check(run: Run, truth: GroundTruth, queries: np.ndarray, n_subsets: int = 10, *, lds_queries: int = 0) -> Float64Check:
    """The ground truth's first n_subsets subsets replayed in float64; with lds_queries, replay's float64 LDS on that many first queries."""
    plan = replay_plan(run, dtype=torch.float64)
    _, test_set = run.datasets()
    x, y = test_set.x[queries].double(), test_set.y[queries]
    subsets = range(min(n_subsets, len(truth.masks)))
    with one_thread():
        margins = np.stack([_float64_margins(plan, truth.masks[subset], x, y) for subset in subsets])
        scores = metagradients(plan, x[:lds_queries], y[:lds_queries], verify=False).numpy() if lds_queries else None
    stored = truth.margins[list(subsets)][:, queries]
    sensitivity = float(np.sqrt(np.mean(np.square(margins - stored))) / truth.margins[:, queries].std(axis=0).mean())
    lds = None
    if scores is not None:
        predicted = scores @ truth.masks[list(subsets)].T.astype(np.float64)  # (queries, subsets), as evaluation.lds predicts
        lds = float(np.nanmean(rowwise_spearman(predicted, margins[:, :lds_queries].T)))
    return Float64Check(sensitivity, lds, len(subsets), lds_queries)


def _float64_margins(plan: ReplayPlan, mask: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The queries' margins after the run replayed in float64 with the mask's examples weighted 0 (order-keeping)."""
    final, _ = replay_forward(plan, torch.as_tensor(mask, dtype=torch.float64), verify=False)
    params = {name: value for name, value in final.items() if name in plan.initial}
    buffers = {name: value for name, value in final.items() if name not in plan.initial}
    with torch.no_grad():
        return plan.measure(params, buffers, x, y).numpy()
