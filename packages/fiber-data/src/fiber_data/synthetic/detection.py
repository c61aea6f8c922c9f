"""COCO detection files of the synthetic world (``annotations/instances_{split}.json``, §11.2): one category per
colour and shape (supercategory = shape); each annotation also carries ``attributes`` (colour, shape, size,
grid position)."""

from __future__ import annotations

from fiber_data.synthetic.config import POSITIONS
from fiber_data.synthetic.writer import CocoFileWriter, DrawnImage, box_annotation, coco_image

__all__ = ["InstancesWriter"]


class InstancesWriter(CocoFileWriter):
    """``instances_{split}.json``: one box per object, with a box polygon as its segmentation."""

    stem, count_key = "instances", "objects"

    def add(self, image: DrawnImage) -> None:
        self.images.append(coco_image(image.image_id, image))
        for obj in image.objects:
            x, y, w, h = obj.bbox
            ann = box_annotation(len(self.annotations) + 1, image.image_id, self.category_of(obj), obj)
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            ann["attributes"] = {
                "color": obj.color,
                "shape": obj.shape,
                "size": obj.size,
                "position": POSITIONS[obj.cell],
            }
            self.annotations.append(ann)
