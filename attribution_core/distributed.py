"""Sharding work over processes: by index ranges in a torch.distributed group, by items under torchrun.

Train-side passes (TRAK featurization, EK-FAC / SOURCE factor fitting): under `torchrun` with an
initialised process group (gloo on CPU, NCCL on GPU) rank r of W takes the rows
`shard_range(n, r, W)` of the training set; per-example results are all-gathered in row order
(`sharded_rows`) and sums are all-reduced (`all_reduce_sum`), so every rank, rank 0 included
(which merges and stores), holds the whole result. With no process group the same code computes
every row in one process.

Retraining jobs (LDS ground truth, counterfactual checks) need no process group: each model is
an independent file in the workspace, so rank r of torchrun's RANK / WORLD_SIZE computes items
r, r + W, ... (`torchrun_shard`) and every rank waits for the others' files (`wait_for_files`).

    torchrun --nproc-per-node 2 my_script.py   # each process calls methods as usual
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of tensor over the ranks (in place, returned); the tensor itself without a process group."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def torchrun_shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE environment; (0, 1) outside torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def wait_for_files(paths: Iterable[Path], poll_seconds: float = 0.5) -> None:
    """Return once every path exists: the other ranks' shares of a sharded job are written."""
    missing = list(paths)
    while missing:
        missing = [path for path in missing if not path.exists()]
        if missing:
            time.sleep(poll_seconds)


def init_from_torchrun() -> bool:
    """Join torchrun's process group (NCCL on GPUs, one per local rank; gloo otherwise); False outside torchrun."""
    if torchrun_shard()[1] == 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # device "cuda" is then this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def agreed(flag: bool) -> bool:
    """Rank 0's flag on every rank (the flag itself without a process group): one decision for a collective job."""
    if rank_and_world()[1] == 1:
        return flag
    decision = torch.tensor([int(flag)])
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()
