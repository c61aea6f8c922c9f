"""What every per-task generator of the synthetic world shares: the drawn image it is handed, its interface,
and the JSON records common to the COCO-style files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiber_data.synthetic.config import SyntheticWorldConfig
from fiber_data.synthetic.scene import SceneObject

__all__ = ["CocoFileWriter", "DrawnImage", "TaskWriter", "box_annotation", "coco_image", "write_json"]


@dataclass(frozen=True)
class DrawnImage:
    """One image of the world, saved under ``images/<split>/<file_name>``.

    Attributes:
        split: ``"train"`` / ``"val"`` / ``"test"``.
        split_index: position of the split in :data:`~fiber_data.synthetic.config.SPLITS` (part of every seed).
        index: position of the image in its split (part of every seed).
        image_id: id unique across splits (train first).
        file_name: the image file name.
        size: side of the square image in pixels.
        objects: the shapes drawn.
        captions: the distinct captions drawn for it, each with the span of every object's phrase.
    """

    split: str
    split_index: int
    index: int
    image_id: int
    file_name: str
    size: int
    objects: list[SceneObject]
    captions: list[tuple[str, list[tuple[int, int]]]]


class TaskWriter:
    """The generator of one task's files: told a split starts, fed its images, then asked to write it.

    Each writer draws from its own seeded generators, so adding or removing one leaves the others' files
    unchanged.
    """

    def __init__(self, config: SyntheticWorldConfig) -> None:
        self.config = config
        self.category_id = {c["name"]: c["id"] for c in config.categories()}

    def start_split(self, split: str) -> None:
        """Forget the images of the previous split."""

    def add(self, image: DrawnImage) -> None:
        """Take one image of the current split."""

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        """Write the files of ``split`` under ``root``; returns counts for the manifest (``{}`` for none)."""
        return {}

    def write_world(self, root: Path) -> None:
        """Write the files that span all splits (after the last split)."""

    def category_of(self, obj: SceneObject) -> int:
        """COCO category id of ``obj`` (one per colour and shape)."""
        return self.category_id[f"{obj.color} {obj.shape}"]


class CocoFileWriter(TaskWriter):
    """A writer of one COCO-layout file per split, ``annotations/<stem>_{split}.json``: ``info``, ``images``,
    ``annotations`` and, with ``categories``, the world's categories. Subclasses fill ``images`` and
    ``annotations`` in :meth:`add`; the manifest counts the annotations under ``count_key`` (not at all when empty)."""

    stem = ""
    categories = True
    count_key = ""

    def start_split(self, split: str) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        payload: dict[str, Any] = {"info": info, "images": self.images, "annotations": self.annotations}
        if self.categories:
            payload["categories"] = self.config.categories()
        write_json(root / "annotations" / f"{self.stem}_{split}.json", payload)
        return {self.count_key: len(self.annotations)} if self.count_key else {}


def write_json(path: Path, payload: Any) -> None:
    """Compact UTF-8 JSON with a final newline (the byte layout of every annotation file of the world)."""
    path.write_text(json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")


def coco_image(entry_id: int, image: DrawnImage) -> dict[str, Any]:
    """A COCO ``images`` entry for ``image`` under id ``entry_id``."""
    return {"id": entry_id, "file_name": image.file_name, "height": image.size, "width": image.size}


def box_annotation(ann_id: int, image_id: int, category_id: int, obj: SceneObject) -> dict[str, Any]:
    """A COCO box annotation of ``obj`` (``bbox`` xywh as floats, ``area`` of the box, not crowd)."""
    x, y, w, h = obj.bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(x), float(y), float(w), float(h)],
        "area": float(w * h),
        "iscrowd": 0,
    }
