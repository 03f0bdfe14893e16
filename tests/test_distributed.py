"""Sharded TRAK featurization over two gloo processes equals one process; mixed precision stays close."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_methods import attribution_inputs, data, mlp

from attribution_core.distributed import rank_and_world, shard_range, sharded_rows
from attribution_core.methods.trak import Trak, TrakSettings

N_TRAIN, SHAPE = 37, (6,)
SETTINGS = TrakSettings(k=16)


def trak_state() -> dict[str, torch.Tensor]:
    """TRAK's fitted state for two tiny MLP checkpoints on seeded random data (batch size 5)."""
    x, y = data(N_TRAIN, SHAPE)
    return Trak(SETTINGS).fit(attribution_inputs([mlp(seed=0), mlp(seed=1)], x, y, batch_size=5))


def _rank_main(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One rank: join the gloo group, fit TRAK, rank 0 saves the state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world)
        state = trak_state()
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


def test_two_gloo_processes_give_the_features_of_one(tmp_path):
    out_file = tmp_path / "state.pt"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    sharded, single = torch.load(out_file), trak_state()
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-6, atol=1e-6)


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
