"""Seeded per-epoch draws and the rank split of distributed readers.

Readers that shuffle or sample per epoch (shard order, batch order, detection prompts) draw from
``numpy`` generators seeded with ``(seed, epoch, ...)``, so every rank and worker draws the same; the training
loop selects the epoch with ``set_epoch``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EpochSeeded", "check_rank"]


class EpochSeeded:
    """Mixin for readers whose draws change with the epoch (subclasses set ``self.seed``)."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (shuffles, prompt samples); call from the training loop."""
        self.epoch = int(epoch)

    def epoch_rng(self, *keys: int) -> np.random.Generator:
        """The generator seeded with ``(seed, epoch, *keys)``."""
        return np.random.default_rng([self.seed, self.epoch, *keys])


def check_rank(rank: int, world_size: int, name: str = "world_size") -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size`` (``name``: how the caller calls the world size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < {name}, got rank={rank}, {name}={world_size}")
