"""Visual Genome region descriptions as coarse-stage captions (docs/reference/data-formats.md §5): one caption
per region phrase. Wrap the :class:`~fiber_data.sources.coco_captions.CaptionTable` in
:class:`~fiber_data.sources.coco_captions.ImageTextDataset`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from fiber_data.errors import AnnotationError
from fiber_data.io import read_json, require
from fiber_data.sources.coco_captions import CaptionTable, CaptionTableBuilder

__all__ = ["read_visual_genome"]


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
