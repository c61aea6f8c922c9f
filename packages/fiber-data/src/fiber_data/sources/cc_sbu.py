"""CC3M / SBU ``annot.json`` lists of ``[image_path, caption]`` as coarse-stage captions
(docs/reference/data-formats.md §4). Wrap the :class:`~fiber_data.sources.coco_captions.CaptionTable` in
:class:`~fiber_data.sources.coco_captions.ImageTextDataset`."""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

from fiber_data.errors import AnnotationError
from fiber_data.io import read_json
from fiber_data.sources.coco_captions import CaptionTable, CaptionTableBuilder

__all__ = ["read_annot_pairs"]


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
