"""The CUDA path gives the CPU path's scores (skipped without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.api import attribute
from attribution_core.data import DataSpec
from attribution_core.models import ModelSpec
from attribution_core.run import CheckpointPolicy, Recipe, Stage
from attribution_core.store import Workspace
from attribution_core.training import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cpu_and_gpu_runs(tmp_path_factory):
    """The same digits run trained twice, in two workspaces, so each device fits its own state."""
    recipe = Recipe((Stage(epochs=3, lr=0.05),), checkpoints=CheckpointPolicy(count=3))
    spec = DataSpec(source="digits", test_size=100, max_train=300)
    return [train(spec, ModelSpec("cnn", {"channels": [8, 16], "hidden": 32}), recipe,
                  Workspace(tmp_path_factory.mktemp(name)), "digits-cnn") for name in ("cpu", "gpu")]


@pytest.mark.parametrize("method, settings", [("trak", {"k": 256}), ("ekfac", None), ("tracin", None), ("source", {"n_segments": 3})])
def test_cuda_scores_equal_cpu_scores(cpu_and_gpu_runs, method, settings):
    cpu_run, gpu_run = cpu_and_gpu_runs
    on_cpu = attribute(cpu_run, method, queries=list(range(20)), settings=settings, device="cpu").values
    on_gpu = attribute(gpu_run, method, queries=list(range(20)), settings=settings, device="cuda").values
    correlation = np.corrcoef(on_cpu.ravel(), on_gpu.ravel())[0, 1]
    assert correlation > 0.999
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-2, atol=1e-3 * np.abs(on_cpu).max())
