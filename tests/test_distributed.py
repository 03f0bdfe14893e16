"""Sharded train-side passes and replay's shared query blocks over two gloo processes equal one process; mixed precision stays close."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_methods import attribution_inputs, cnn, data, mlp

from attribution_core.api import attribute
from attribution_core.data import DataSpec
from attribution_core.distributed import rank_and_world, shard_range, sharded_rows, torchrun_shard
from attribution_core.methods.influence import Influence
from attribution_core.methods.source import Source, SourceSettings
from attribution_core.methods.trak import Trak, TrakSettings
from attribution_core.models import ModelSpec
from attribution_core.numerics.inputs import AttributionInputs, Segment
from attribution_core.runs.run import CheckpointPolicy, Recipe, Stage, load_run
from attribution_core.runs.training import train
from attribution_core.store import Artifact, Workspace, atomic_write_json, compute_once_across_ranks

N_TRAIN = 37  # not a multiple of the world size or of the batch size


def fitted(method: str) -> tuple[Trak | Influence | Source, AttributionInputs, dict[str, torch.Tensor]]:
    """(method, inputs, fitted state) for tiny checkpoints on seeded random data (batch size 5)."""
    if method == "ekfac_cnn":  # convolutions: positions summed in the factors
        x, y = data(N_TRAIN, (2, 6, 6))
        inputs = attribution_inputs([cnn(seed=0)], x, y, batch_size=5)
        return Influence(), inputs, Influence().fit(inputs)
    x, y = data(N_TRAIN, (6,))
    models = [mlp(seed=0), mlp(seed=1)]
    inputs = attribution_inputs(models, x, y, batch_size=5)
    attributor = {"trak": Trak(TrakSettings(k=16)), "ekfac": Influence(), "source": Source(SourceSettings(n_segments=1))}[method]
    if method == "source":
        inputs.segments = [Segment(models, lr_sum=0.5)]
    return attributor, inputs, attributor.fit(inputs)


def _rank_main(rank: int, world: int, init_file: str, out_file: str, method: str) -> None:
    """One rank: join the gloo group, fit the method, rank 0 saves the state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world)
        _, _, state = fitted(method)
        if rank == 0:
            torch.save(state, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n, world", [(10, 3), (37, 2), (2, 4), (0, 2)])
def test_shard_ranges_tile_the_rows_in_order(n, world):
    ranges = [shard_range(n, rank, world) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_without_a_process_group_everything_is_computed_here():
    assert rank_and_world() == (0, 1)
    assert sharded_rows(7, lambda rows: torch.arange(7)[rows]).tolist() == list(range(7))


@pytest.mark.parametrize("method", ["trak", "ekfac", "ekfac_cnn", "source"])
def test_two_gloo_processes_fit_the_state_of_one(tmp_path, method):
    out_file = tmp_path / "state.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out_file), method), nprocs=2, join=True)
    attributor, inputs, single = fitted(method)
    sharded = torch.load(out_file, weights_only=True)
    assert sharded.keys() == single.keys()
    # Sums in another order differ by rounding, which can turn eigenvectors of nearly equal
    # eigenvalues: compare what the states compute, the scores of training examples as queries.
    query_x, query_y = inputs.train_x[:8], inputs.train_y[:8]
    expected = attributor.score(single, inputs, query_x, query_y)
    torch.testing.assert_close(attributor.score(sharded, inputs, query_x, query_y), expected,
                               rtol=1e-4, atol=1e-4 * expected.abs().max().item())


REPLAY_QUERIES = [0, 1, 2, 3, 4]
REPLAY_SETTINGS = {"query_block": 2}  # five queries in blocks of two: the ranks' shares are 3 and 2 queries, in 2 and 1 blocks


def _replay_rank_main(rank: int, world: int, init_file: str, out_file: str, root: str) -> None:
    """One rank: join the gloo group and attribute through the front door; every rank gets all scores, rank 0 saves them."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores = attribute(load_run(root, "replay"), "replay", queries=REPLAY_QUERIES, settings=REPLAY_SETTINGS, device="cpu")
        torch.save(torch.as_tensor(scores.values), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_share_replay_query_blocks_and_score_as_one(tmp_path):
    recipe = Recipe((Stage(epochs=2, lr=0.05, batch_size=16),), seed=0, checkpoints=CheckpointPolicy(every_epochs=1))
    run = train(DataSpec(source="digits", test_size=20, split_seed=0, max_train=48), ModelSpec("mlp", {"hidden": [8]}), recipe,
                Workspace(tmp_path / "sharded"), "replay")
    shutil.copytree(tmp_path / "sharded", tmp_path / "single")
    mp.spawn(_replay_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "scores"), str(run.workspace.root)), nprocs=2, join=True)
    single = attribute(load_run(tmp_path / "single", "replay"), "replay", queries=REPLAY_QUERIES, settings=REPLAY_SETTINGS, device="cpu")
    for rank in range(2):  # every rank holds every query's scores, in order
        np.testing.assert_allclose(torch.load(f"{tmp_path / 'scores'}.{rank}").numpy(), single.values, rtol=1e-5,
                                   atol=1e-6 * np.abs(single.values).max())
    stored = attribute(load_run(tmp_path / "sharded", "replay"), "replay", queries=REPLAY_QUERIES, settings=REPLAY_SETTINGS)
    assert stored.key == single.key  # rank 0 stored them where one process would have
    np.testing.assert_allclose(stored.values, single.values, rtol=1e-5, atol=1e-6 * np.abs(single.values).max())


def _compute_once_rank_main(rank: int, world: int, init_file: str, directory: str) -> None:
    """One rank: ask twice for one artifact computed once across the ranks; log who computed and who saved, and when."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        artifact = Artifact(Path(directory) / "artifact", {"made": "once"})
        log = Path(directory) / f"rank{rank}.log"

        def compute() -> int:
            with open(log, "a") as handle:
                handle.write("computed\n")
            return 40 + rank

        def save(stored: Artifact, result: int) -> None:
            with open(log, "a") as handle:
                handle.write("saved\n")
            atomic_write_json(stored.path("result.json"), result)

        for _ in range(2):
            compute_once_across_ranks(artifact, compute, save)
            with open(log, "a") as handle:  # every rank returns only once the artifact is stored
                handle.write(f"complete {artifact.is_complete()}\n")
    finally:
        dist.destroy_process_group()


def test_an_artifact_computed_across_ranks_is_computed_by_all_stored_by_rank_0_and_then_reused(tmp_path):
    mp.spawn(_compute_once_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logs = [(tmp_path / f"rank{rank}.log").read_text().split("\n")[:-1] for rank in range(2)]
    assert logs[0] == ["computed", "saved", "complete True", "complete True"]
    assert logs[1] == ["computed", "complete True", "complete True"]
    assert (tmp_path / "artifact" / "result.json").read_text() == "40", "rank 0's result"


def test_torchrun_environment_names_this_process_share(monkeypatch):
    assert torchrun_shard() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert torchrun_shard() == (1, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 is outside WORLD_SIZE=3"):
        torchrun_shard()


def test_bfloat16_features_correlate_with_float32():
    model = mlp(seed=0, d_in=32, hidden=64, n_classes=5)
    x, y = data(64, (32,), n_classes=5)
    inputs = attribution_inputs([model], x, y, batch_size=16)
    features = {}
    for amp_dtype in (None, "bfloat16"):
        method = Trak(TrakSettings(k=64, amp_dtype=amp_dtype))
        features[amp_dtype] = method.train_features(model, inputs, method.projector(inputs)).flatten()
    correlation = torch.corrcoef(torch.stack([features[None], features["bfloat16"]]))[0, 1]
    assert features["bfloat16"].dtype == torch.float32
    assert correlation > 0.99


@pytest.mark.slow  # two torchrun ranks, each importing torch
def test_tdx_attribute_under_torchrun_stores_the_scores_of_one_process(demo_workspace, tmp_path):
    single_root, sharded_root = tmp_path / "single", tmp_path / "sharded"
    for root in (single_root, sharded_root):
        shutil.copytree(demo_workspace.root, root)
    command = ["attribute", "fmnist-mlp", "--method", "ekfac", "--queries", "0-3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000)]
    subprocess.run([*torchrun, "-m", "attribution_core.cli", *command, "--workspace", str(sharded_root)], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    single = attribute(load_run(single_root, "fmnist-mlp"), "ekfac", queries=[0, 1, 2, 3])
    sharded = attribute(load_run(sharded_root, "fmnist-mlp"), "ekfac", queries=[0, 1, 2, 3])
    assert sharded.key == single.key and sharded.settings == single.settings
    np.testing.assert_allclose(sharded.values, single.values, rtol=1e-3, atol=1e-3 * np.abs(single.values).max())
