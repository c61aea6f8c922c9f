"""Training-data sources of the image-text stages: several datasets, mixed with weights, map-style or streamed.

A recipe lists its sources under ``data.sources``::

    data:
      sources:
        - {kind: karpathy, path: /data/coco/dataset_coco.json, images: /data/coco, splits: [train, val]}
        - {kind: vg, path: /data/vg/region_descriptions.json, images: /data/vg/VG_100K}
        - {kind: annot-pairs, path: /data/sbu/annot.json, images: /data/sbu/images}
        - {kind: arrow, path: "/data/arrow/conceptual_caption_train_{0..30}.arrow"}

``weight: 0`` (the default everywhere) reproduces the reference: one uniform draw over all pairs of all
sources. Positive weights draw a source with probability proportional to its weight, then a pair uniformly
inside it (:class:`WeightedMixtureSampler`). ``kind: tar`` streams WebDataset shards (img2dataset layout) and
cannot be mixed with map-style sources; it is split by rank and dataloader worker and resumes by skipping the
micro-batches already consumed. ``kind: webdataset`` streams the same shards through the ``webdataset`` package
(paths, ``pipe:`` commands, ``http(s)://`` URLs), with ``resampled: true`` (endless, resumes at its exact position
without re-reading) and ``shuffle_buffer: N``::

    - {kind: webdataset, path: "pipe:aws s3 cp s3://bucket/laion/{00000..41455}.tar -", resampled: true,
       shuffle_buffer: 5000}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Sampler

from fiber_data import (
    ArrowCaptionDataset,
    CocoCaptionsDataset,
    ConcatImageTextDataset,
    ImageTextDataset,
    KarpathyCaptionsDataset,
    TarImageTextDataset,
    read_annot_pairs,
    read_visual_genome,
)
from fiber_data.formats.tar import expand_shards
from fiber_train.config import STREAM_KINDS, SourceConfig

OnError = Literal["raise", "skip"]
"""``data.on_error``: stop at the first bad training record, or skip (and count) it."""


@dataclass
class TrainData:
    """What :func:`build_train_data` returns: the dataset and, for weighted mixtures, its sampler factory."""

    dataset: Dataset
    weights: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def _map_source(src: SourceConfig, transform: Any) -> ImageTextDataset | ArrowCaptionDataset:
    if src.kind == "coco-captions":
        return CocoCaptionsDataset(src.path, src.images, transform=transform)
    if src.kind == "karpathy":
        return KarpathyCaptionsDataset(src.path, src.images, transform, splits=src.splits)
    if src.kind == "arrow":
        return ArrowCaptionDataset(expand_shards(src.path), transform)
    if src.kind == "vg":
        return ImageTextDataset(read_visual_genome(src.path, [src.images]), transform)
    if src.kind == "annot-pairs":
        return ImageTextDataset(read_annot_pairs(src.path, src.images), transform)
    raise AssertionError(src.kind)


def build_train_data(
    sources: Sequence[SourceConfig],
    transform: Any,
    *,
    seed: int,
    rank: int,
    world_size: int,
    on_error: OnError = "raise",
) -> TrainData:
    """The training dataset of ``sources``.

    ``on_error`` applies to streams here (a skipped stream sample is dropped, not counted: a stream cannot
    report per-record skips through the batch yet); map-style datasets are wrapped by the task.

    Raises:
        ValueError: streaming (``tar``) sources mixed with map-style ones or given weights.
    """
    if not sources:
        raise ValueError("data.sources is empty")
    streamed = [s for s in sources if s.kind in STREAM_KINDS]
    if streamed:
        if len(streamed) != len(sources):
            raise ValueError("data.sources: `tar` (streaming) sources cannot be mixed with map-style sources")
        if any(s.weight for s in streamed):
            raise ValueError("data.sources: weights are not supported for `tar` sources (list them as one source)")
        if streamed[0].kind == "webdataset":
            return TrainData(_webdataset_stream(streamed, transform, seed, rank, world_size, on_error))
        shards = [p for s in streamed for p in expand_shards(s.path)]
        ds = TarImageTextDataset(
            shards, transform, shuffle_shards=True, seed=seed, rank=rank, world_size=world_size, on_error=on_error
        )
        return TrainData(ds)
    parts = [_map_source(s, transform) for s in sources]
    sizes = [len(p) for p in parts]
    for s, n in zip(sources, sizes, strict=True):
        if n == 0:
            raise ValueError(f"data.sources: {s.kind} source {s.path} has no (image, caption) pairs")
    dataset = parts[0] if len(parts) == 1 else ConcatImageTextDataset(parts)
    weights = [s.weight for s in sources] if any(s.weight for s in sources) else []
    if weights and not all(weights):
        raise ValueError("data.sources: give every source a positive weight, or none (uniform over pairs)")
    return TrainData(dataset, weights, sizes)


def _webdataset_stream(
    sources: Sequence[SourceConfig], transform: Any, seed: int, rank: int, world_size: int, on_error: OnError
) -> Dataset:
    from fiber_data.formats.streaming import WebDatasetImageText, expand_urls

    first = sources[0]
    for s in sources[1:]:
        if (s.kind, s.resampled, s.shuffle_buffer) != (first.kind, first.resampled, first.shuffle_buffer):
            raise ValueError(
                "data.sources: list every webdataset shard pattern in one source (or give them all the same kind, "
                "resampled and shuffle_buffer)"
            )
    urls = [u for s in sources for u in expand_urls(s.path)]
    return WebDatasetImageText(
        urls,
        transform,
        resampled=first.resampled,
        shuffle_buffer=first.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        on_error=on_error,
    )


class WeightedMixtureSampler(Sampler[int]):
    """Draws a source with probability ``weight / sum(weights)``, then a pair uniformly inside it.

    Deterministic and resumable like :class:`~fiber_train.sampling.ResumableRandomSampler`: the draws of
    "epoch" ``e`` (``len(self)`` draws per rank) come from a generator seeded with ``seed + e`` and the rank,
    and :meth:`set_position` skips the ones already consumed.

    Args:
        sizes: number of pairs per source, in concatenation order.
        weights: positive weights, one per source.
        seed / rank / world_size: as the uniform sampler.
        epoch_size: draws per rank per epoch (default: total pairs / world size).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_size: int | None = None,
    ) -> None:
        if len(sizes) != len(weights) or not sizes or min(weights) <= 0:
            raise ValueError("need one positive weight per source")
        self.sizes = torch.tensor(list(sizes), dtype=torch.long)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.probs = torch.tensor(list(weights), dtype=torch.double) / float(sum(weights))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch_size = epoch_size or max(1, int(self.sizes.sum()) // world_size)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.epoch_size

    def _draws(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed + epoch) * 1_000_003 + self.rank)
        src = torch.multinomial(self.probs, self.epoch_size, replacement=True, generator=g)
        within = (torch.rand(self.epoch_size, generator=g, dtype=torch.double) * self.sizes[src]).long()
        return self.offsets[src] + within

    def __iter__(self) -> Iterator[int]:
        draws = self._draws(self.epoch)
        for i in range(self.position, len(draws)):
            self.position = i + 1
            yield int(draws[i])
        self.epoch += 1
        self.position = 0

    def set_position(self, epoch: int, position: int) -> None:
        self.epoch = epoch
        self.position = position
