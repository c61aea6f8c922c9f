"""Streaming img2dataset-style WebDataset shards through the ``webdataset`` package.

:class:`WebDatasetImageText` reads the same shards as :class:`~fiber_data.formats.tar.TarImageTextDataset` (one
sample = adjacent members sharing a key: ``000123.jpg`` + ``000123.txt`` and/or ``000123.json``), but from any
URL the ``webdataset`` package opens: local paths, ``pipe:<shell command>`` (e.g. ``pipe:aws s3 cp s3://b/x.tar
-``) and ``http(s)://`` (through ``curl``); URL lists use its brace (``{000000..000999}``, ``{a,b}``) and ``::``
syntax. It adds what a web-scale stream needs:

- **resampled shards** (``resampled=True``): every rank and DataLoader worker draws shards with replacement,
  deterministically from ``(seed, rank, worker)`` (``webdataset.ResampledShards``): an endless stream, as in
  OpenCLIP; without it the shard list is split by rank and then by worker (each shard read once per epoch,
  shard order shuffled per epoch);
- a **shuffle buffer** of samples (``webdataset.shuffle``), seeded the same way;
- a **resume position** (:meth:`WebDatasetImageText.set_resume_position`): a resumed run skips the samples
  each worker had produced as raw bytes, before image decoding;
- the safety limits of the stdlib reader (one member loop, :func:`fiber_data.formats.tar.iter_tar_members`): a
  member larger than ``max_member_bytes`` or a sample larger than ``MAX_SAMPLE_BYTES`` is a
  :class:`~fiber_data.errors.DataError` naming the shard and sample, and links, devices and directories are
  skipped unread (members are never extracted to disk).

Needs the ``webdataset`` extra: ``pip install 'fiber-data[webdataset]'``.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, BinaryIO, Literal, cast

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import get_worker_info

from fiber_data.errors import DataError
from fiber_data.formats.tar import MAX_MEMBER_BYTES, TarImageTextDataset, iter_tar_members
from fiber_data.types import ImageTextSample

__all__ = ["WebDatasetImageText", "expand_urls", "iter_url_samples"]


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise ImportError(
            "streaming shards through the webdataset package needs it: pip install 'fiber-data[webdataset]'"
        ) from None
    return webdataset


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand shard URLs with the ``webdataset`` syntax: ``::``-separated lists and braces (``{000..009}``
    ranges keep their zero padding, ``{a,b}`` alternatives); a list is expanded item by item."""
    from webdataset.shardlists import expand_urls as wds_expand

    _webdataset()
    if isinstance(urls, str):
        return list(wds_expand(urls))
    return [u for item in urls for u in wds_expand(item)]


def iter_url_samples(url: str, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict[str, bytes | str]]:
    """Yield the raw samples (``{"__key__", "__url__", <ext>: bytes}``) of the shard at ``url``, streamed.

    ``url`` is opened with ``webdataset.gopen`` (a path, ``pipe:...``, ``http(s)://...``); the tar stream is read
    member by member with the limits of :func:`fiber_data.formats.tar.iter_tar_samples`.

    Raises:
        DataError: the URL cannot be opened, the stream is not a readable tar (a failed download or command
            included), or a member is larger than ``max_member_bytes``; the message names ``url`` (and the key).
    """
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot open shard ({type(exc).__name__}: {exc})", file=url) from exc
    try:
        with stream, tarfile.open(fileobj=cast(BinaryIO, stream), mode="r|*") as tar:
            yield from iter_tar_members(tar, url, max_member_bytes=max_member_bytes)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # OSError also: a command's exit status
        raise DataError(f"unreadable tar stream ({type(exc).__name__}: {exc})", file=url) from exc


class WebDatasetImageText(TarImageTextDataset):
    """Stream (image, caption) pairs from img2dataset-style shards through the ``webdataset`` package.

    Args:
        urls: shard URLs or URL patterns (see :func:`expand_urls`).
        transform: PIL image -> ``FloatTensor [3, H, W]``.
        resampled: draw shards with replacement per rank and worker (an endless stream; see the module
            docstring); otherwise split the shard list by rank, then worker.
        shuffle_shards: without ``resampled``, shuffle the shard order with ``seed + epoch`` (:meth:`set_epoch`).
        shuffle_buffer: samples held in the shuffle buffer (0 or 1: stream order).
        seed: seed of the shard draws, the shard order and the shuffle buffer.
        rank / world_size: this process's rank and the number of processes.
        on_error: ``"raise"`` or ``"skip"`` samples that lack an image/caption or fail to decode (unreadable
            shards and oversized members always raise).
        image_keys / text_keys: member extensions tried for the image and the caption (as the tar reader).
        max_member_bytes: largest member read into memory.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        transform: Callable[[Image.Image], Tensor],
        *,
        resampled: bool = False,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_error: Literal["raise", "skip"] = "raise",
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        text_keys: Sequence[str] = ("txt", "caption"),
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ) -> None:
        _webdataset()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        super().__init__(
            expand_urls(urls),
            transform,
            image_keys=image_keys,
            text_keys=text_keys,
            shuffle_shards=shuffle_shards and not resampled,
            seed=seed,
            rank=rank,
            world_size=world_size,
            on_error=on_error,
        )
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.max_member_bytes = max_member_bytes
        self._resume_batches = 0
        self._resume_batch_size = 0
        self._resume_workers = 0

    def set_resume_position(self, consumed_batches: int, batch_size: int, num_workers: int) -> None:
        """Make the next iteration start after the first ``consumed_batches`` batches that a ``DataLoader`` with
        ``batch_size`` and ``num_workers`` (and ``drop_last``) drew from this dataset.

        Such a loader takes batch ``i`` from worker ``i % num_workers``, each worker batching its own stream, so
        each worker skips the samples of its share of the batches, and the new loader's worker ``w`` continues the
        stream of the original worker ``(w + consumed_batches) % num_workers``. Only for ``resampled`` streams (an endless
        stream has no epoch boundary to cross); a finite stream resumes by skipping batches.

        Raises:
            ValueError: the stream is not ``resampled``.
        """
        if not self.resampled:
            raise ValueError("set_resume_position needs resampled=True; skip batches of a finite stream instead")
        self._resume_batches = int(consumed_batches)
        self._resume_batch_size = int(batch_size)
        self._resume_workers = max(1, int(num_workers))

    def _worker(self) -> tuple[int, int]:
        """``(worker, num_workers)``; after a resume, the worker of the original run whose stream this one continues
        (a new loader starts at worker 0, the original would have gone on with worker ``consumed % workers``)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return (worker + self._resume_batches) % workers, workers

    def _seed(self, worker: int, stream: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, stream]).generate_state(1)[0])

    def _skip(self, worker: int, workers: int) -> int:
        if not self._resume_batches:
            return 0
        if workers != self._resume_workers:
            raise ValueError(
                f"resume position was set for {self._resume_workers} DataLoader workers, but {workers} are running"
            )
        batches = self._resume_batches // workers + (1 if worker < self._resume_batches % workers else 0)
        return batches * self._resume_batch_size

    def shard_urls(self) -> Iterator[str]:
        """The shard URLs this rank and worker read, in order (endless when ``resampled``)."""
        if not self.resampled:
            yield from self.my_shards()
            return
        worker, _ = self._worker()
        seed = self._seed(worker, 0)
        shards = _webdataset().ResampledShards(self.shards, seed=seed, worker_seed=lambda: 0, deterministic=True)
        for item in shards:
            yield item["url"]

    def raw_samples(self) -> Iterator[dict[str, bytes | str]]:
        """Undecoded samples of this rank and worker, after the shuffle buffer and the resume skip."""
        worker, workers = self._worker()
        stream: Iterator[dict[str, bytes | str]] = (
            raw for url in self.shard_urls() for raw in iter_url_samples(url, max_member_bytes=self.max_member_bytes)
        )
        if self.shuffle_buffer > 1:
            import random

            rng = random.Random(self._seed(worker, 1))
            stream = iter(_webdataset().shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream))
        return islice(stream, self._skip(worker, workers), None)

    def __iter__(self) -> Iterator[ImageTextSample]:
        for raw in self.raw_samples():
            try:
                yield self._decode(raw)
            except DataError:
                if self.on_error == "raise":
                    raise
