"""What the replay benchmarks (B7, B8) share: how much a run's training amplifies rounding-size perturbations."""
from __future__ import annotations

import numpy as np
import torch

from attribution_core.evaluation.lds import GroundTruth
from attribution_core.runs.replay_engine import replay_forward, replay_plan
from attribution_core.runs.run import Run
from attribution_core.runs.threads import one_thread


def rounding_sensitivity(run: Run, truth: GroundTruth, queries: np.ndarray, n_subsets: int = 10) -> float:
    """rms over (subset, query) of float64 − float32 (stored) order-keeping margins, over the queries' mean std across subsets.

    Near 0: the ground truth is a smooth function of the example weights. A sizeable fraction: training
    amplifies perturbations of rounding size (ReLU kinks and max-pool choices flipped, then grown), and no
    first-order score, replay's exact derivative included, can predict that part.
    """
    plan = replay_plan(run, dtype=torch.float64)
    _, test_set = run.datasets()
    x, y = test_set.x[queries].double(), test_set.y[queries]
    changes = []
    with one_thread():
        for subset in range(min(n_subsets, len(truth.masks))):
            final, _ = replay_forward(plan, torch.as_tensor(truth.masks[subset], dtype=torch.float64), verify=False)
            params = {name: value for name, value in final.items() if name in plan.initial}
            buffers = {name: value for name, value in final.items() if name not in plan.initial}
            with torch.no_grad():
                margins = plan.measure(params, buffers, x, y)
            changes.append(margins.numpy() - truth.margins[subset, queries])
    return float(np.sqrt(np.mean(np.square(changes))) / truth.margins[:, queries].std(axis=0).mean())
