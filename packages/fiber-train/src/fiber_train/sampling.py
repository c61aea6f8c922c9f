"""A seeded, rank-aware, resumable random sampler.

The order of epoch ``e`` is a permutation drawn from ``seed + e``; rank ``r`` of ``W`` takes every ``W``-th
index after padding the permutation to a multiple of ``W``. The sampler's state is just
``(epoch, position)``, so a resumed run continues with exactly the samples an uninterrupted run would have
seen, whatever the number of dataloader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Shuffled indices of ``range(num_samples)`` for one rank, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank / world_size: this process's shard.
        shuffle: ``False`` keeps dataset order (still sharded and resumable).
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # samples of this rank's shard already yielded in ``epoch``

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def _shard(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        total = len(self) * self.world_size
        if total > self.num_samples:  # pad by wrapping so every rank gets the same count
            order = torch.cat([order, order[: total - self.num_samples]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        shard = self._shard(self.epoch)
        start = self.position
        for i in range(start, len(shard)):
            self.position = i + 1
            yield int(shard[i])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``; note that dataloader prefetching runs ahead of consumption, so the loop
        stores its own count of consumed samples instead (see :meth:`set_position`)."""
        return {"epoch": self.epoch, "position": self.position}

    def set_position(self, epoch: int, position: int) -> None:
        """Continue from sample ``position`` of ``epoch``'s shard at the next ``iter``."""
        self.epoch = epoch
        self.position = position
