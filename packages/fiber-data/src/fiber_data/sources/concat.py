"""Several image-text datasets sampled uniformly as one (docs/reference/training.md §1.1), with ``sample.index``
rewritten to the position in the concatenation (so queued hard negatives can be fetched again by index)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence, Sized
from dataclasses import replace
from typing import cast

import numpy as np
from torch.utils.data import Dataset

from fiber_data.io import check_index
from fiber_data.types import ImageTextSample

__all__ = ["ConcatImageTextDataset"]


class ConcatImageTextDataset(Dataset[ImageTextSample]):
    """Several image-text datasets as one (uniform over all pairs, docs/reference/training.md §1.1).

    ``sample.index`` is the position in the concatenation, and ``image_id`` is prefixed with the part number
    (``"<part>:<id>"``) when ``prefix_ids`` is true, so ids from different sources cannot collide.

    Args:
        datasets: the parts.
        prefix_ids: make image ids unique across parts.
    """

    def __init__(self, datasets: Sequence[Dataset[ImageTextSample]], *, prefix_ids: bool = True) -> None:
        if not datasets:
            raise ValueError("need at least one dataset")
        self.datasets = list(datasets)
        self.prefix_ids = prefix_ids
        # map-style datasets have __len__; torch's Dataset does not declare it
        self.cumulative = np.cumsum([len(cast(Sized, d)) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(part, index within the part)`` of a global index."""
        check_index(index, len(self), "pairs")
        part = bisect.bisect_right(self.cumulative, index)
        return part, index - (self.cumulative[part - 1] if part else 0)

    def __getitem__(self, index: int) -> ImageTextSample:
        part, local = self.locate(index)
        sample = self.datasets[part][local]
        image_id = f"{part}:{sample.image_id}" if self.prefix_ids else sample.image_id
        return replace(sample, index=index, image_id=image_id)
