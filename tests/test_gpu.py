"""The CUDA path gives the CPU path's scores, and replays the CPU-trained run (skipped without a GPU)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from attribution_core.api import attribute
from attribution_core.data import DataSpec
from attribution_core.models import ModelSpec
from attribution_core.runs.replay_engine import metagradients, replay_forward, replay_plan
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import Workspace

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


@pytest.fixture(scope="module")
def replay_runs(tmp_path_factory):
    """A two-stage digits MLP trained on the CPU (SGD on noisy pixels, then Adam on five classes), and a copy for the GPU's scores."""
    recipe = Recipe((Stage(epochs=2, lr=0.05, batch_size=32, transform="noise"),
                     Stage(epochs=2, lr=0.005, optimizer="adam", batch_size=32, classes=(0, 1, 2, 3, 4))),
                    checkpoints=CheckpointPolicy(every_epochs=1))
    root = tmp_path_factory.mktemp("replay")
    run = train(DataSpec(source="digits", test_size=100, max_train=300), ModelSpec("mlp", {"hidden": [32]}), recipe,
                Workspace(root / "cpu"), "digits-mlp")
    shutil.copytree(root / "cpu", root / "gpu")
    return run, load_run(root / "gpu", "digits-mlp")


def test_replay_on_cuda_reproduces_the_cpu_trained_run_and_its_derivative(replay_runs):
    run, _ = replay_runs
    replay_forward(replay_plan(run, device="cuda"), verify=True, tolerance=1e-4)  # every stored checkpoint, both stages
    _, test_set = run.datasets()
    x, y = test_set.x[:8], test_set.y[:8]
    on_gpu = metagradients(replay_plan(run, device="cuda", dtype=torch.float64), x, y, verify=False).cpu()
    on_cpu = metagradients(replay_plan(run, dtype=torch.float64), x, y, verify=False)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-6, atol=1e-9 * on_cpu.abs().max().item())


def test_replay_scores_on_cuda_equal_cpu_scores_through_the_front_door(replay_runs):
    cpu_run, gpu_run = replay_runs
    queries, settings = list(range(40)), {"query_block": 16}
    on_cpu = attribute(cpu_run, "replay", queries=queries, settings=settings, device="cpu").values
    on_gpu = attribute(gpu_run, "replay", queries=queries, settings=settings, device="cuda").values
    assert np.corrcoef(on_cpu.ravel(), on_gpu.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-2, atol=1e-3 * np.abs(on_cpu).max())
