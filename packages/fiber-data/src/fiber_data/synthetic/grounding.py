"""MDETR-style grounding files of the synthetic world (§9): ``annotations/grounding_{split}.json`` (one entry per
(image, caption); ``tokens_positive`` = the "<size> <colour> <shape>" phrase of each box) and
``annotations/refexp_{split}.json`` (RefCOCO-style: one entry and one box per referring expression naming one
object among distractors with the fewest attributes that single it out)."""

from __future__ import annotations

from fiber_data.synthetic.language import referring_expression
from fiber_data.synthetic.writer import CocoFileWriter, DrawnImage, box_annotation, coco_image

__all__ = ["GroundingWriter", "RefexpWriter"]


class GroundingWriter(CocoFileWriter):
    """``grounding_{split}.json``: every caption of an image is an entry; every object a box of it."""

    stem = "grounding"

    def add(self, image: DrawnImage) -> None:
        for text, spans in image.captions:
            entry_id = len(self.images) + 1
            self.images.append(
                {
                    **coco_image(entry_id, image),
                    "caption": text,
                    "dataset_name": "synthetic",
                    "original_id": image.image_id,
                    "tokens_negative": [[0, len(text)]],
                }
            )
            for obj, (b, e) in zip(image.objects, spans):
                ann = box_annotation(len(self.annotations) + 1, entry_id, self.category_of(obj), obj)
                self.annotations.append({**ann, "tokens_positive": [[b, e]]})


class RefexpWriter(CocoFileWriter):
    """``refexp_{split}.json``: one referring expression per object (drawn with seed ``(seed, split, image, 3)``)."""

    stem, count_key = "refexp", "referring_expressions"

    def add(self, image: DrawnImage) -> None:
        import numpy as np

        rng = np.random.default_rng([self.config.seed, image.split_index, image.index, 3])
        for obj in image.objects:
            expression, (b, e) = referring_expression(obj, image.objects, rng)
            ref_id = len(self.images) + 1
            self.images.append(
                {
                    **coco_image(ref_id, image),
                    "original_id": image.image_id,
                    "caption": expression,
                    "dataset_name": "refcoco",
                    "tokens_negative": [[b, e]],
                }
            )
            self.annotations.append(
                {**box_annotation(ref_id, ref_id, self.category_of(obj), obj), "tokens_positive": [[b, e]]}
            )
