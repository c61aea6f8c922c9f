"""MDETR-style grounding files of the synthetic world (§9): ``annotations/grounding_{split}.json`` (one entry per
(image, caption); ``tokens_positive`` = the "<size> <colour> <shape>" phrase of each box) and
``annotations/refexp_{split}.json`` (RefCOCO-style: one entry and one box per referring expression naming one
object among distractors with the fewest attributes that single it out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fiber_data.synthetic.language import referring_expression
from fiber_data.synthetic.writer import DrawnImage, TaskWriter, box_annotation, coco_image, write_json

__all__ = ["GroundingWriter", "RefexpWriter"]


class _MdetrWriter(TaskWriter):
    """Entries and box annotations of one MDETR-style file per split (``<stem>_{split}.json``)."""

    stem = ""

    def start_split(self, split: str) -> None:
        self.entries: list[dict[str, Any]] = []
        self.boxes: list[dict[str, Any]] = []

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        payload = {
            "info": info,
            "images": self.entries,
            "annotations": self.boxes,
            "categories": self.config.categories(),
        }
        write_json(root / "annotations" / f"{self.stem}_{split}.json", payload)
        return {}


class GroundingWriter(_MdetrWriter):
    """``grounding_{split}.json``: every caption of an image is an entry; every object a box of it."""

    stem = "grounding"

    def add(self, image: DrawnImage) -> None:
        for text, spans in image.captions:
            entry_id = len(self.entries) + 1
            self.entries.append(
                {
                    **coco_image(entry_id, image),
                    "caption": text,
                    "dataset_name": "synthetic",
                    "original_id": image.image_id,
                    "tokens_negative": [[0, len(text)]],
                }
            )
            for obj, (b, e) in zip(image.objects, spans):
                ann = box_annotation(len(self.boxes) + 1, entry_id, self.category_of(obj), obj)
                self.boxes.append({**ann, "tokens_positive": [[b, e]]})


class RefexpWriter(_MdetrWriter):
    """``refexp_{split}.json``: one referring expression per object (drawn with seed ``(seed, split, image, 3)``)."""

    stem = "refexp"

    def add(self, image: DrawnImage) -> None:
        import numpy as np

        rng = np.random.default_rng([self.config.seed, image.split_index, image.index, 3])
        for obj in image.objects:
            expression, (b, e) = referring_expression(obj, image.objects, rng)
            ref_id = len(self.entries) + 1
            self.entries.append(
                {
                    **coco_image(ref_id, image),
                    "original_id": image.image_id,
                    "caption": expression,
                    "dataset_name": "refcoco",
                    "tokens_negative": [[b, e]],
                }
            )
            self.boxes.append(
                {**box_annotation(ref_id, ref_id, self.category_of(obj), obj), "tokens_positive": [[b, e]]}
            )

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        super().write_split(root, split, info)
        return {"referring_expressions": len(self.entries)}
