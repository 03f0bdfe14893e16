"""Sharding train-side work by index ranges over the processes of a torch.distributed group.

Under `torchrun` (or any initialised process group: gloo on CPU, NCCL on GPU) rank r of W takes
the rows `shard_range(n, r, W)` of the training set, computes its per-example results, and the
shards are all-gathered so that every rank (rank 0 included, which merges and stores) holds the
whole result in row order. With no process group the same code computes every row in one process.

    torchrun --nproc-per-node 2 my_script.py   # each process calls methods as usual
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n rows; shares differ in size by at most one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return n * rank // world, n * (rank + 1) // world


def local_rows(n: int) -> slice:
    """This process's rows of n: all of them without a process group."""
    return slice(*shard_range(n, *rank_and_world()))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's shard (rows shard_range(n, r, W)) concatenated in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return local
    sizes = [stop - start for start, stop in (shard_range(n, r, world) for r in range(world))]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))  # all_gather needs equal shapes
    padded[: len(local)] = local
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:size] for shard, size in zip(shards, sizes)])


def sharded_rows(n: int, compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """compute(rows) -> (len(rows), ...) for all n rows: this rank's share here, the rest gathered."""
    return gather_rows(compute(local_rows(n)), n)
