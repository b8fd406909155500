"""Which rank and which DataLoader worker this code runs in: one small read-only value, and the rank,
size and barrier of the process group (when there is one) that packing and the stream need.

Joining the group and the collectives of training live in :mod:`signscale.training.distributed`;
everything here degrades to one process (rank 0 of 1) without torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import get_worker_info


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    worker: int = 0
    num_workers: int = 1

    @classmethod
    def current(cls, rank: int | None = None, world_size: int | None = None) -> "World":
        """Read the process group and the worker info; explicit rank/world_size override the group."""
        if rank is None or world_size is None:
            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local_rank = env_world()[2]
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, worker=worker, num_workers=workers)

    @property
    def is_main(self) -> bool:
        return self.rank == 0 and self.worker == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun set them, or (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()
