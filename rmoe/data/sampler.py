"""A shuffling sampler and a data loader that make resume exact, on one process or many.

Each epoch's order is a permutation drawn from ``seed + epoch`` alone; each process takes every
``num_replicas``-th index (``DistributedSampler``'s sharding, so Lightning keeps it under DDP); after a
mid-epoch resume the batches already consumed are skipped, so the next batch is the one the uninterrupted run
would have seen. :class:`ResumableDataLoader` is ``Stateful``, so Lightning saves its position in every
checkpoint (and does not warn that the loader is not resumable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from rmoe.errors import RmoeError


class ResumableShuffleSampler(DistributedSampler):
    """Seeded per-epoch shuffle that skips the batches already consumed in the current epoch.

    Args:
        batch_size: Per-process batch size (the skip is counted in batches).
        batches_done: ``epoch -> batches of it this process already trained on`` (0 except right after a
            resume), called when an epoch's iteration starts.
        num_replicas, rank: Default: the process group's size and rank, or 1 and 0.
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


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableShuffleSampler` whose position is part of the checkpoint.

    ``state_dict()`` is the epoch, the batches of it this process trained on, and what that count depends on
    (seed, per-process batch size, processes). The skip itself comes from the restored optimiser step
    (``batches_done``), so a checkpoint without this state resumes the same way; ``load_state_dict`` only checks
    it, and a mismatch (another batch size, seed, process count or gradient accumulation) is an error instead of
    a silently different run.
    """

    sampler: ResumableShuffleSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableShuffleSampler):
            raise TypeError("ResumableDataLoader needs a ResumableShuffleSampler")

    def state_dict(self) -> dict[str, int]:
        return self._position(self.sampler.epoch)

    def _position(self, epoch: int) -> dict[str, int]:
        s = self.sampler
        return {
            "epoch": int(epoch),
            "batches_done": int(s.batches_done(epoch) if s.batches_done is not None else 0),
            "seed": int(s.seed),
            "batch_size": int(s.batch_size),
            "num_replicas": int(s.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Check the checkpoint's position against this run's (Lightning calls it once the step is restored)."""
        now = self._position(int(state.get("epoch", 0)))
        if any(state.get(key) != value for key, value in now.items()):
            raise RmoeError(
                f"resume: the checkpoint's data position {dict(state)} differs from this run's {now}; resume with "
                "the batch size, seed, number of processes and gradient accumulation the checkpoint was trained with."
            )
