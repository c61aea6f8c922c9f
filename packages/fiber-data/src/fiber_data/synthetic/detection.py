"""COCO detection files of the synthetic world (``annotations/instances_{split}.json``, §11.2): one category per
colour and shape (supercategory = shape); each annotation also carries ``attributes`` (colour, shape, size,
grid position)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fiber_data.synthetic.config import POSITIONS
from fiber_data.synthetic.writer import DrawnImage, TaskWriter, box_annotation, coco_image, write_json

__all__ = ["InstancesWriter"]


class InstancesWriter(TaskWriter):
    """``instances_{split}.json``: one box per object, with a box polygon as its segmentation."""

    def start_split(self, split: str) -> None:
        self.images: list[dict[str, Any]] = []
        self.instances: list[dict[str, Any]] = []

    def add(self, image: DrawnImage) -> None:
        self.images.append(coco_image(image.image_id, image))
        for obj in image.objects:
            x, y, w, h = obj.bbox
            ann = box_annotation(len(self.instances) + 1, image.image_id, self.category_of(obj), obj)
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            ann["attributes"] = {
                "color": obj.color,
                "shape": obj.shape,
                "size": obj.size,
                "position": POSITIONS[obj.cell],
            }
            self.instances.append(ann)

    def write_split(self, root: Path, split: str, info: dict[str, Any]) -> dict[str, int]:
        payload = {
            "info": info,
            "images": self.images,
            "annotations": self.instances,
            "categories": self.config.categories(),
        }
        write_json(root / "annotations" / f"instances_{split}.json", payload)
        return {"objects": len(self.instances)}
