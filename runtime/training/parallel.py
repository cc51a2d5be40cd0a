"""Data-parallel drafter training: which process this is, and the few collectives training needs.

`torchrun --nproc_per_node N blockpilot train-drafter ...` starts N processes with RANK, LOCAL_RANK
and WORLD_SIZE set. Each joins one group (NCCL on GPUs, gloo on CPUs), builds the same global batch
plan every step and trains on its own slice of it, and DistributedDataParallel averages the gradients,
so N processes take the steps one process would over the same global batch. Only the first process
writes (features, checkpoints, logs, the drafter). Without those variables there is one process and
every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This process's contiguous slice of a global batch (which must divide evenly)."""
        if len(items) % self.world_size:
            raise ValueError(f"a global batch of {len(items)} sequences does not split over {self.world_size} "
                             f"processes: make train.sequences_per_step a multiple of the process count")
        size = len(items) // self.world_size
        return items[self.rank * size: (self.rank + 1) * size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over every process (in place)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The first process runs the block alone (it writes what the others then read), the others after it."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def join() -> Workers:
    """This process's place in the group torchrun started (joining it the first time), or a lone process."""
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Workers()
    cuda = torch.cuda.is_available()
    if cuda:  # one GPU per process: "cuda" then means this process's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: the first process validates on the CPU while the others wait at the next step.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return Workers(dist.get_rank(), dist.get_world_size())


def leave(workers: Workers) -> None:
    if workers.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
