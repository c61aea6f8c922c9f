"""More coarse-stage caption sources and their concatenation (docs/reference/training.md §1.1, docs/reference/data-formats.md §4-§5).

- :func:`read_visual_genome`: region descriptions, one caption per region phrase (§5);
- :func:`read_annot_pairs`: the CC3M / SBU ``annot.json`` lists of ``[image_path, caption]`` (§4);
- :class:`ConcatImageTextDataset`: several image-text datasets sampled uniformly as one, with
  ``sample.index`` rewritten to the position in the concatenation (so queued hard negatives can be fetched
  again by index).

All readers return a :class:`~fiber_data.coco_captions.CaptionTable`; wrap it in
:class:`~fiber_data.coco_captions.ImageTextDataset`.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence, Sized
from dataclasses import replace
from os import PathLike
from pathlib import Path
from typing import cast

import numpy as np
from torch.utils.data import Dataset

from fiber_data.coco_captions import CaptionTable, CaptionTableBuilder
from fiber_data.errors import AnnotationError
from fiber_data.io import read_json, require
from fiber_data.types import ImageTextSample

__all__ = ["ConcatImageTextDataset", "read_annot_pairs", "read_visual_genome"]


def read_visual_genome(
    regions_file: str | PathLike[str],
    image_dirs: Sequence[str | PathLike[str]],
) -> CaptionTable:
    """Visual Genome ``region_descriptions.json`` → one caption per region phrase (§5).

    Images without regions are skipped. Each image is looked up as ``<id>.jpg`` in the ``image_dirs`` in
    order (``VG_100K/``, then ``VG_100K_2/``); images found in none of them are reported by the dataset when
    accessed, under the first folder.

    Args:
        regions_file: the JSON list of ``{"id", "regions": [...]}``.
        image_dirs: candidate image folders.
    """
    f = Path(regions_file)
    data = read_json(f)
    if not isinstance(data, list):
        raise AnnotationError("expected a JSON list of images", file=f)
    dirs = [Path(d) for d in image_dirs]
    if not dirs:
        raise ValueError("image_dirs must name at least one folder")
    listing = [set(os.listdir(d)) if d.is_dir() else set() for d in dirs]
    table = CaptionTableBuilder(f)
    for i, rec in enumerate(data):
        where = f"[{i}]"
        iid = require(rec, "id", int, file=f, where=where)
        regions = require(rec, "regions", list, file=f, where=where)
        if not regions:
            continue
        name = f"{iid}.jpg"
        folder = next((d for d, names in zip(dirs, listing) if name in names), dirs[0])
        row = table.add_image(iid, folder / name, where)
        for k, region in enumerate(regions):
            rwhere = f"{where}.regions[{k}]"
            table.add_text(require(region, "phrase", str, file=f, where=rwhere), row, rwhere)
    return table.build(id_dtype=np.int64)


def read_annot_pairs(annot_file: str | PathLike[str], image_dir: str | PathLike[str]) -> CaptionTable:
    """CC3M / SBU ``*annot.json`` (``[[image_path, caption], ...]``) → captions (§4).

    Only the base name of ``image_path`` is used: it must equal an image file name somewhere under
    ``image_dir`` (e.g. ``images_train/<shard>/<key>``); the folder tree is scanned once. Pairs whose image is
    absent are dropped (most CC3M URLs are dead); compare ``len(table.texts)`` with the file's length to see
    how many.

    Args:
        annot_file: the annotation list.
        image_dir: root of the downloaded images.
    """
    f = Path(annot_file)
    data = read_json(f)
    if not isinstance(data, list):
        raise AnnotationError("expected a JSON list of [image_path, caption] pairs", file=f)
    found: dict[str, str] = {}
    for folder, _, names in os.walk(image_dir):
        for name in names:
            found.setdefault(name, os.path.join(folder, name))
    table = CaptionTableBuilder(f)
    row_of: dict[str, int] = {}
    for i, pair in enumerate(data):
        where = f"[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise AnnotationError("expected [image_path, caption]", file=f, record=where)
        key = os.path.basename(pair[0])
        path = found.get(key)
        if path is None:
            continue
        row = row_of.get(key)
        if row is None:
            row = row_of[key] = table.add_image(key, path, where)
        table.add_text(pair[1], row, where)
    return table.build(id_dtype=object)


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
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        part = bisect.bisect_right(self.cumulative, index)
        return part, index - (self.cumulative[part - 1] if part else 0)

    def __getitem__(self, index: int) -> ImageTextSample:
        part, local = self.locate(index)
        sample = self.datasets[part][local]
        image_id = f"{part}:{sample.image_id}" if self.prefix_ids else sample.image_id
        return replace(sample, index=index, image_id=image_id)
