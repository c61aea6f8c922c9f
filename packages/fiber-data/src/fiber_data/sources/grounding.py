"""MDETR-style grounding data for the fine-grained stage (docs/reference/data-formats.md §9, docs/reference/training.md §3.8).

:class:`MdetrGroundingDataset` reads the COCO-like grounding JSON (Flickr30k Entities, RefCOCO/+/g, GoldG, or
the synthetic world's ``grounding_*.json``), one sample per ``images[]`` entry (one (image, text) pair), as
§9.5 prescribes: crowd boxes dropped, xywh → xyxy with the "+1" convention and clamped to the image,
degenerate boxes dropped, entries without any valid box removed.

:class:`GroundingCollator` tokenises the captions, turns every box's character spans into a binary token
positive map (:func:`~fiber_data.text.tokenizer.positive_map_from_spans`) and pads the images bottom/right to a
multiple of the size divisibility.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fiber_data.boxes import REPAIR_KINDS, BoxColumns, clip_boxes_counted, repairs_summary
from fiber_data.errors import AnnotationError
from fiber_data.images.transforms import GroundingTransform, load_image
from fiber_data.io import annotations_by_image, as_int, check_index, read_json, require
from fiber_data.robust import split_for_collate
from fiber_data.sampling import EpochSeeded, check_rank
from fiber_data.text.spans import positive_map_from_spans
from fiber_data.types import EmptyBatch, GroundingBatch, GroundingSample, GroundingTarget, SkippedSample, Tokenizer

logger = logging.getLogger("fiber_data")

__all__ = ["AspectRatioBatchSampler", "GroundingCollator", "MdetrGroundingDataset"]


class MdetrGroundingDataset(Dataset[GroundingSample]):
    """One sample per (image, text) entry of an MDETR-style grounding file (docs/reference/data-formats.md §9).

    Args:
        ann_file: the grounding JSON.
        image_root: image folder; a mapping ``{data_source: folder}`` selects the folder per entry for the
            GoldG mixture (``"vg"``, ``"coco"``); entries without ``data_source`` use the ``"default"`` key.
        transform: a :class:`~fiber_data.images.transforms.GroundingTransform` (or any callable with its signature).
        generator: RNG for the random resize/flip; ``None`` uses torch's global RNG (seeded per worker).
        keep_empty: keep entries that end up without a valid box (removed by default, §9.5 step 4).

    Storage is columnar: boxes, labels and spans of all entries live in flat numpy arrays with offsets.
    """

    def __init__(
        self,
        ann_file: str | PathLike[str],
        image_root: str | PathLike[str] | Mapping[str, str | PathLike[str]],
        transform: GroundingTransform,
        *,
        generator: torch.Generator | None = None,
        keep_empty: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        self.ann_file = Path(ann_file)
        #: boxes and images repaired or dropped while loading, and records skipped (keys of REPAIR_KINDS)
        self.repairs: dict[str, int] = dict.fromkeys(REPAIR_KINDS, 0)
        roots = (
            {"default": Path(image_root)}
            if isinstance(image_root, (str, PathLike))
            else {k: Path(v) for k, v in image_root.items()}
        )
        self.transform = transform
        self.generator = generator
        f = self.ann_file
        skip = on_error == "skip"
        data = read_json(f, escape_bad_utf8=skip)
        images = require(data, "images", list, file=f, where="top level")
        anns = require(data, "annotations", list, file=f, where="top level")
        skipped: list[str] = []

        per_image = annotations_by_image(anns, file=f, skipped=skipped if skip else None)

        columns = BoxColumns()
        captions: list[str] = []
        names: list[str] = []
        span_offsets = [0]  # per box: range into all_spans
        all_spans: list[tuple[int, int]] = []
        seen: set[int] = set()
        for i, rec in enumerate(images):
            where = f"images[{i}]"
            try:
                parsed = self._parse_image(rec, where, anns, per_image, roots, seen)
            except AnnotationError as exc:
                if not skip:
                    raise
                skipped.append(f"{exc.record}: {exc.message}")
                continue
            iid, name, caption, width, height, source, boxes_xywh, labels, spans = parsed
            xyxy, valid = clip_boxes_counted(np.asarray(boxes_xywh, dtype=np.float64), width, height, self.repairs)
            if not valid.any() and not keep_empty:
                self.repairs["images_without_valid_boxes_removed"] += 1
                continue
            kept = np.flatnonzero(valid)
            columns.add(iid, str(roots[source] / name), (height, width), where, xyxy[kept], [labels[k] for k in kept])
            captions.append(caption)
            names.append(str(rec.get("dataset_name", "")))
            for k in kept:
                all_spans.extend(spans[k])
                span_offsets.append(len(all_spans))
        self.repairs["records_skipped"] = len(skipped)
        self.skipped_records = tuple(skipped)
        if any(self.repairs.values()):
            logger.warning("%s: %s%s", f, repairs_summary(self.repairs), f" (first: {skipped[0]})" if skipped else "")
        self.image_ids, self.orig_sizes, self.box_offsets, self.boxes, self.labels = columns.arrays()
        self.image_paths = columns.paths
        self.records = columns.records
        self.captions = captions
        self.dataset_names = names
        self.span_offsets = np.asarray(span_offsets, dtype=np.int64)
        self.spans = np.asarray(all_spans, dtype=np.int64).reshape(-1, 2)

    def _parse_image(
        self,
        rec: Any,
        where: str,
        anns: list[Any],
        per_image: dict[int, list[int]],
        roots: Mapping[str, Path],
        seen: set[int],
    ) -> tuple[int, str, str, int, int, str, list[list[float]], list[int], list[list[tuple[int, int]]]]:
        """Check image record ``rec`` and its annotations; raises :class:`AnnotationError` naming the record."""
        f = self.ann_file
        iid = require(rec, "id", int, file=f, where=where)
        if iid in seen:
            raise AnnotationError(f"duplicate image id {iid}", file=f, record=where)
        seen.add(iid)
        name = require(rec, "file_name", str, file=f, where=where)
        caption = require(rec, "caption", str, file=f, where=where)
        width, height = as_int(rec.get("width")), as_int(rec.get("height"))
        if width is None or height is None or not (0 < width < 2**31 and 0 < height < 2**31):
            raise AnnotationError("fields 'width' and 'height' must be positive integers", file=f, record=where)
        source = rec.get("data_source", "default")
        if source not in roots:
            if "default" not in roots:
                raise AnnotationError(f"no image root given for data_source {source!r}", file=f, record=where)
            source = "default"
        boxes_xywh: list[list[float]] = []
        labels: list[int] = []
        spans: list[list[tuple[int, int]]] = []
        for j in per_image.get(iid, []):
            a = anns[j]
            awhere = f"annotations[{j}]"
            if a.get("iscrowd", 0):
                continue
            bbox = require(a, "bbox", list, file=f, where=awhere)
            if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                raise AnnotationError(f"bbox should be [x, y, w, h], got {bbox!r:.60}", file=f, record=awhere)
            tp = require(a, "tokens_positive", list, file=f, where=awhere)
            box_spans = []
            for span in tp:
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                    raise AnnotationError(
                        f"tokens_positive entry {span!r:.40} is not [start, end]", file=f, record=awhere
                    )
                if not 0 <= span[0] < span[1] <= len(caption):
                    raise AnnotationError(
                        f"tokens_positive span {span} is outside the caption (length {len(caption)})",
                        file=f,
                        record=awhere,
                    )
                box_spans.append((int(span[0]), int(span[1])))
            boxes_xywh.append([float(v) for v in bbox])
            category = require(a, "category_id", int, file=f, where=awhere) if "category_id" in a else 1
            labels.append(int(category))
            spans.append(box_spans)
        return iid, name, caption, width, height, source, boxes_xywh, labels, spans

    def __len__(self) -> int:
        return len(self.captions)

    def annotation(self, index: int) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
        """``(boxes [N, 4] xyxy in original pixels, labels [N], spans per box)`` of entry ``index``."""
        lo, hi = int(self.box_offsets[index]), int(self.box_offsets[index + 1])
        spans = [
            [(int(s), int(e)) for s, e in self.spans[self.span_offsets[k] : self.span_offsets[k + 1]]]
            for k in range(lo, hi)
        ]
        return self.boxes[lo:hi], self.labels[lo:hi], spans

    def __getitem__(self, index: int) -> GroundingSample:
        check_index(index, len(self), "entries")
        boxes, labels, spans = self.annotation(index)
        image = load_image(self.image_paths[index], record=f"{self.records[index]} ({self.ann_file.name})")
        h, w = (int(v) for v in self.orig_sizes[index])
        if image.size != (w, h):
            # The annotation's size is authoritative for the boxes; rescale them to the decoded image.
            sx, sy = image.width / w, image.height / h
            boxes = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
        caption = self.captions[index]
        box_tensor = torch.from_numpy(np.array(boxes))
        if hasattr(self.transform, "transform_sample"):
            # GroundingTransform: a flip may also swap "left"/"right" in the caption (flip_text="swap").
            pixels, tboxes, caption, tspans = self.transform.transform_sample(
                image, box_tensor, caption, spans, generator=self.generator
            )
        else:
            pixels, tboxes = self.transform(image, box_tensor, generator=self.generator)
            tspans = tuple(tuple(s) for s in spans)
        return GroundingSample(
            image_id=int(self.image_ids[index]),
            image=pixels,
            caption=caption,
            boxes=tboxes,
            labels=torch.from_numpy(np.array(labels)),
            tokens_positive=tspans,
            orig_size=(h, w),
            index=index,
            dataset_name=self.dataset_names[index],
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(entries={len(self)}, boxes={len(self.labels)}, source={str(self.ann_file)!r})"


class GroundingCollator:
    """``collate_fn`` for :class:`~fiber_data.types.GroundingSample` lists (docs/reference/training.md §3.8-§3.9).

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer` (RoBERTa in the reference).
        max_length: text truncation length (256 in the reference).
        padding: ``"longest"`` (default) or ``"max_length"`` for the text.
        size_divisibility: images are padded bottom/right with zeros to the batch maximum rounded up to a
            multiple of this (32 in the reference).

    The positive map of each box is binary (the dataset-side row normalisation of the reference is undone by
    its collator, so the training target is the same).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int = 256,
        *,
        padding: Literal["longest", "max_length"] = "longest",
        size_divisibility: int = 32,
    ) -> None:
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding: Literal["longest", "max_length"] = padding
        self.size_divisibility = size_divisibility

    def __call__(self, samples: Sequence[GroundingSample | SkippedSample | None]) -> GroundingBatch | EmptyBatch:
        """Collate ``B`` samples into a :class:`~fiber_data.types.GroundingBatch`.

        ``pixel_mask [B, Hp, Wp]`` is ``True`` inside each unpadded image. Skipped / ``None`` samples are
        dropped and listed in ``batch.skipped``; an :class:`~fiber_data.types.EmptyBatch` comes back when all
        were skipped.
        """
        samples, skipped = split_for_collate(samples)
        if not samples:
            return EmptyBatch(skipped)
        d = self.size_divisibility
        hp = max(int(s.image.shape[1]) for s in samples)
        wp = max(int(s.image.shape[2]) for s in samples)
        hp, wp = math.ceil(hp / d) * d, math.ceil(wp / d) * d
        pixel_values = torch.zeros((len(samples), 3, hp, wp), dtype=torch.float32)
        pixel_mask = torch.zeros((len(samples), hp, wp), dtype=torch.bool)
        for i, s in enumerate(samples):
            pixel_values[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
            pixel_mask[i, : s.image.shape[1], : s.image.shape[2]] = True
        captions = tuple(s.caption for s in samples)
        enc = self.tokenizer(captions, max_length=self.max_length, padding=self.padding)
        targets = []
        for i, s in enumerate(samples):
            pm = positive_map_from_spans(enc, [list(sp) for sp in s.tokens_positive], batch_index=i, normalize=False)
            targets.append(
                GroundingTarget(boxes=s.boxes.float().reshape(-1, 4), positive_map=pm, labels=s.labels.long())
            )
        return GroundingBatch(
            pixel_values=pixel_values,
            image_sizes=torch.tensor([[s.image.shape[1], s.image.shape[2]] for s in samples], dtype=torch.long),
            input_ids=enc.input_ids.long(),
            attention_mask=enc.attention_mask.bool(),
            targets=tuple(targets),
            index=torch.tensor([s.index for s in samples], dtype=torch.long),
            image_ids=tuple(s.image_id for s in samples),
            captions=captions,
            orig_sizes=tuple(s.orig_size for s in samples),
            pixel_mask=pixel_mask,
            skipped=skipped,
        )


class AspectRatioBatchSampler(EpochSeeded, Sampler[list[int]]):
    """Batches of images with the same orientation (landscape vs portrait), docs/reference/training.md §3.9.

    Grouping keeps the zero padding of :class:`GroundingCollator` small. Each epoch shuffles the indices
    (``seed``, ``epoch``), takes this rank's share (``rank::num_replicas``), splits it into the two
    orientation groups, cuts each group into batches and orders the batches by the shuffled position of their
    first element.

    Args:
        sizes: ``[N, 2]`` ``(height, width)`` per sample (e.g. ``dataset.orig_sizes``).
        batch_size: images per batch.
        shuffle: shuffle every epoch (else dataset order).
        seed: shuffle seed.
        drop_last: drop the incomplete last batch of each group.
        num_replicas / rank: distributed split of the samples.
    """

    def __init__(
        self,
        sizes: np.ndarray | Sequence[tuple[int, int]],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        hw = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_rank(rank, num_replicas, "num_replicas")
        self.landscape = hw[:, 1] >= hw[:, 0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank

    def _batches(self) -> list[list[int]]:
        n = len(self.landscape)
        order = self.epoch_rng().permutation(n) if self.shuffle else np.arange(n)
        mine = order[self.rank :: self.num_replicas]
        batches: list[tuple[int, list[int]]] = []
        for flag in (True, False):
            positions = np.flatnonzero(self.landscape[mine] == flag)
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append((int(chunk[0]), [int(i) for i in mine[chunk]]))
        batches.sort(key=lambda item: item[0])
        return [b for _, b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
