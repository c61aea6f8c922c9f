"""Error policy during training: skip samples that fail to load instead of stopping the run.

Every reader of this package raises a :class:`~fiber_data.errors.DataError` naming the file and the record
at fault. For long runs on web-scale data, one corrupt JPEG should not stop training: wrap the dataset in
:class:`SkipBadSamples` with ``policy="skip"``. A sample that raises then becomes a
:class:`~fiber_data.types.SkippedSample` (a warning names the file and the record), every collator of this
package drops it and lists it in ``batch.skipped`` as ``"dataset:file:record"``, and the trainer counts the
skips per dataset from there. When every sample of a batch is skipped, the collator returns an
:class:`~fiber_data.types.EmptyBatch` (``len(batch) == 0``).

With ``policy="raise"`` (the default) the error propagates unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Sized
from typing import Any, Literal, TypeVar, cast

from torch.utils.data import Dataset

from fiber_data.errors import DataError
from fiber_data.types import SkippedSample

__all__ = ["SkipBadSamples", "split_skipped"]

logger = logging.getLogger("fiber_data")

T = TypeVar("T")


class SkipBadSamples(Dataset[Any]):
    """Wrap a map-style dataset with an error policy for :class:`~fiber_data.errors.DataError`.

    Args:
        dataset: any map-style dataset of this package (or one raising ``DataError`` on bad records).
        policy: ``"raise"`` lets the error propagate; ``"skip"`` returns a
            :class:`~fiber_data.types.SkippedSample` instead and logs a warning naming the file and record.
        name: dataset name used in the skip descriptions; defaults to ``dataset.name`` or the class name.

    Other attributes (``orig_sizes``, ``set_epoch``, ...) are forwarded to the wrapped dataset, so samplers
    that read them keep working. ``num_skipped`` counts the skips *in this process* (each DataLoader worker
    has its own copy; count from ``batch.skipped`` instead).
    """

    def __init__(self, dataset: Dataset[Any], policy: Literal["raise", "skip"] = "raise", name: str | None = None):
        if policy not in ("raise", "skip"):
            raise ValueError(f"policy must be 'raise' or 'skip', got {policy!r}")
        self.dataset = dataset
        self.policy = policy
        self.name = name or str(getattr(dataset, "name", None) or type(dataset).__name__)
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # map-style datasets have __len__; torch's Dataset does not declare it

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DataError as exc:
            if self.policy == "raise":
                raise
            self.num_skipped += 1
            skipped = SkippedSample(
                dataset=self.name,
                file=exc.file or "",
                record="" if exc.record is None else str(exc.record),
                message=exc.message,
                index=int(index),
            )
            logger.warning("skipping sample %d of %s: %s", index, self.name, exc)
            return skipped

    def __getattr__(self, attr: str) -> Any:
        # Only called when normal lookup fails; guard "dataset" so unpickling (no __dict__ yet) cannot recurse.
        if attr == "dataset":
            raise AttributeError(attr)
        return getattr(self.dataset, attr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, policy={self.policy!r}, name={self.name!r})"


def split_skipped(samples: Sequence[T | SkippedSample | None]) -> tuple[list[T], tuple[str, ...]]:
    """Separate real samples from skipped ones.

    Args:
        samples: what a DataLoader hands to a collator.

    Returns:
        ``(kept samples in order, descriptions of the skipped ones)``; a plain ``None`` is described as
        ``"unknown:?:?"``.
    """
    kept: list[T] = []
    skipped: list[str] = []
    for s in samples:
        if s is None:
            skipped.append("unknown:?:?")
        elif isinstance(s, SkippedSample):
            skipped.append(s.description)
        else:
            kept.append(s)
    return kept, tuple(skipped)


def split_for_collate(samples: Sequence[T | SkippedSample | None]) -> tuple[list[T], tuple[str, ...]]:
    """:func:`split_skipped` at the start of a collator (which returns an ``EmptyBatch`` of the skipped
    descriptions when nothing is kept).

    Raises:
        ValueError: ``samples`` is empty (a DataLoader never hands over an empty batch).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return split_skipped(samples)
