"""Data-parallel sharding under ``torchrun``: every rank takes the global batches ``rank, rank + world, ...``
(the batches a single process would run, so results are identical) and rank 0 gathers the predictions."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the ``torchrun`` process group (gloo) when ``WORLD_SIZE`` > 1; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), owns)


def shard_batches(n_items: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Global batches of consecutive indices; rank r takes batches r, r + world, ... (strided, deterministic)."""
    batches = [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]
    return batches[rank::world]


def gather_to_main(obj, info: DistInfo):
    """List of every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` in a single process."""
    if info.world <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()
