"""A shuffling sampler that makes resume exact, on one process or many.

Each epoch's order is a permutation drawn from ``seed + epoch`` (nothing depends on how many
epochs a generator went through before), each process takes every ``num_replicas``-th index
(``DistributedSampler``'s sharding, so Lightning keeps it as is under DDP), and when training
resumes from a checkpoint taken mid-epoch the batches the run already consumed are skipped, so
the first batch after a resume is the one the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableShuffleSampler(DistributedSampler):
    """Seeded per-epoch shuffle that skips the batches already consumed in the current epoch.

    Args:
        dataset_size: Number of examples.
        batch_size: Per-process batch size (the skip is counted in batches).
        seed: Shuffle seed.
        batches_done: Called when an epoch's iteration starts, with the epoch; returns how many
            batches of that epoch this process already trained on (0 except right after a resume).
        num_replicas: Number of processes (default: the process group's size, or 1).
        rank: This process (default: its rank in the process group, or 0).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        batches_done: Callable[[int], int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = (
            num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if initialised else 1)
        )
        rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
        super().__init__(
            range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.batches_done = batches_done

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas].tolist()
        skip = self.batches_done(self.epoch) if self.batches_done is not None else 0
        yield from mine[max(0, skip) * self.batch_size :]
