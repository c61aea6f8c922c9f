"""Caption files of the synthetic world: COCO captions (``annotations/captions_{split}.json``, §3) and the
Karpathy split JSON over all splits (``annotations/karpathy.json``, §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fiber_data.synthetic.config import SyntheticWorldConfig
from fiber_data.synthetic.writer import CocoFileWriter, DrawnImage, TaskWriter, coco_image, write_json

__all__ = ["CocoCaptionsWriter", "KarpathyWriter"]


class CocoCaptionsWriter(CocoFileWriter):
    """``captions_{split}.json``: one ``images`` entry per image, one annotation per caption."""

    stem, categories, count_key = "captions", False, "captions"

    def add(self, image: DrawnImage) -> None:
        self.images.append(coco_image(image.image_id, image))
        for text, _ in image.captions:
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image.image_id, "caption": text})


class KarpathyWriter(TaskWriter):
    """``karpathy.json``: every image of every split with its sentences (ids run across splits)."""

    def __init__(self, config: SyntheticWorldConfig) -> None:
        super().__init__(config)
        self.images: list[dict[str, Any]] = []
        self.next_sentence = 0

    def add(self, image: DrawnImage) -> None:
        sentences = []
        for text, _ in image.captions:
            tokens = text.lower().rstrip(".").replace(",", "").replace(":", "").split()
            sentences.append({"raw": text, "tokens": tokens, "imgid": len(self.images), "sentid": self.next_sentence})
            self.next_sentence += 1
        self.images.append(
            {
                "filepath": image.split,
                "filename": image.file_name,
                "imgid": len(self.images),
                "cocoid": image.image_id,
                "split": image.split,
                "sentids": [x["sentid"] for x in sentences],
                "sentences": sentences,
            }
        )

    def write_world(self, root: Path) -> None:
        write_json(root / "annotations" / "karpathy.json", {"dataset": "synthetic", "images": self.images})
