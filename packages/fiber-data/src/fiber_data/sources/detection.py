"""COCO-style detection JSON read as grounding data (docs/reference/data-formats.md §11, docs/reference/training.md §3.8).

:class:`DetectionGroundingDataset` reads COCO / Objects365 (JSON) / LVIS / ODinW detection files, maps the
category ids to contiguous labels ``1..K`` in ascending id order (§11.2), converts boxes with the "+1"
convention and drops crowd and degenerate boxes (§12), and writes a class-name prompt per sample:

- training (``sampler`` given): the classes present plus sampled negatives (:class:`DetectionPromptSampler`);
  boxes whose class did not fit are dropped;
- evaluation (no sampler): every class in label order, one caption (use :func:`chunk_prompts` and
  ``prompt=`` to evaluate large label spaces chunk by chunk).

LVIS files have no ``file_name``; the path is the last two components of ``coco_url`` (§11.3). ODinW
RoboFlow exports carry a dataset-level category with id 0, removed here (§11.4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fiber_data.boxes import REPAIR_KINDS, BoxColumns, clip_boxes_counted, repairs_summary
from fiber_data.errors import AnnotationError
from fiber_data.images.transforms import GroundingTransform, load_image
from fiber_data.io import annotations_by_image, check_index, read_json, require
from fiber_data.prompts import DetectionPromptSampler, Prompt, build_prompt
from fiber_data.sampling import EpochSeeded
from fiber_data.types import GroundingSample

__all__ = ["DetectionGroundingDataset"]

logger = logging.getLogger("fiber_data")


class DetectionGroundingDataset(EpochSeeded, Dataset[GroundingSample]):
    """Detection boxes with class-name prompts, as :class:`~fiber_data.types.GroundingSample`.

    Args:
        ann_file: COCO-style detection JSON.
        image_root: image folder.
        transform: a :class:`~fiber_data.images.transforms.GroundingTransform`.
        sampler: training prompt sampler built on :attr:`label_names`; ``None`` = evaluation prompt with all
            classes (or ``prompt``).
        prompt: fixed evaluation prompt (e.g. one chunk of :func:`~fiber_data.prompts.chunk_prompts`).
        seed: base seed of the per-sample prompt RNG (``seed``, epoch via :meth:`set_epoch`, index).
        remove_empty: drop images without any valid box (training); evaluation keeps all images.
        drop_background_category: remove a category with id 0 (ODinW exports) and its boxes.

    Nothing is repaired silently: boxes clipped to the image, boxes dropped as degenerate or non-finite and
    images removed for lack of a valid box are counted in :attr:`repairs` (keys :data:`REPAIR_KINDS`), logged
    once as a warning naming the file, and reported by the trainer per source (metrics and final summary).
    Crowd boxes are ignored by the format's definition (not counted).

    Attributes:
        label_names: contiguous label → class name.
        label_to_category_id: contiguous label → original category id (for exporting results).
        repairs: counts of repaired / dropped boxes and removed images (see above).
    """

    def __init__(
        self,
        ann_file: str | PathLike[str],
        image_root: str | PathLike[str],
        transform: GroundingTransform,
        *,
        sampler: DetectionPromptSampler | None = None,
        prompt: Prompt | None = None,
        seed: int = 0,
        remove_empty: bool = True,
        drop_background_category: bool = True,
    ) -> None:
        f = self.ann_file = Path(ann_file)
        root = Path(image_root)
        self.transform = transform
        self.sampler = sampler
        self.seed = seed
        #: boxes and images repaired or dropped while loading (counted, reported by the trainer; see the class doc)
        self.repairs: dict[str, int] = dict.fromkeys((k for k in REPAIR_KINDS if k != "records_skipped"), 0)
        data = read_json(f)
        cats = require(data, "categories", list, file=f, where="top level")
        images = require(data, "images", list, file=f, where="top level")
        anns = require(data, "annotations", list, file=f, where="top level")
        cat_names: dict[int, str] = {}
        for k, c in enumerate(cats):
            cid = require(c, "id", int, file=f, where=f"categories[{k}]")
            name = require(c, "name", str, file=f, where=f"categories[{k}]")
            if cid == 0 and drop_background_category:
                continue
            cat_names[cid] = name
        ordered = sorted(cat_names)
        self.label_to_category_id: dict[int, int] = {i + 1: cid for i, cid in enumerate(ordered)}
        category_to_label = {cid: i + 1 for i, cid in enumerate(ordered)}
        self.label_names: dict[int, str] = {i + 1: cat_names[cid] for i, cid in enumerate(ordered)}
        self.prompt = prompt if prompt is not None else build_prompt(sorted(self.label_names), self.label_names)

        per_image = annotations_by_image(anns, file=f)
        columns = BoxColumns()
        for i, im in enumerate(images):
            where = f"images[{i}]"
            iid = require(im, "id", int, file=f, where=where)
            if "file_name" in im:
                rel = require(im, "file_name", str, file=f, where=where)
            elif isinstance(im, dict) and isinstance(im.get("coco_url"), str):
                rel = "/".join(im["coco_url"].split("/")[-2:])  # LVIS: "<split>/<file>"
            else:
                raise AnnotationError("missing field 'file_name' (and no 'coco_url')", file=f, record=where)
            w = require(im, "width", int, file=f, where=where)
            h = require(im, "height", int, file=f, where=where)
            xywh, labels = [], []
            for j in per_image.get(iid, []):
                a = anns[j]
                if a.get("iscrowd", 0):
                    continue
                cid = require(a, "category_id", int, file=f, where=f"annotations[{j}]")
                if cid not in category_to_label:
                    if cid == 0 and drop_background_category:
                        continue
                    raise AnnotationError(
                        f"category_id {cid} is not in 'categories'", file=f, record=f"annotations[{j}]"
                    )
                bbox = require(a, "bbox", list, file=f, where=f"annotations[{j}]")
                if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                    raise AnnotationError(
                        f"bbox should be [x, y, w, h], got {bbox!r:.60}", file=f, record=f"annotations[{j}]"
                    )
                xywh.append(bbox)
                labels.append(category_to_label[cid])
            xyxy, valid = clip_boxes_counted(np.asarray(xywh, dtype=np.float64), w, h, self.repairs)
            if remove_empty and not valid.any():
                self.repairs["images_without_valid_boxes_removed"] += 1
                continue
            columns.add(iid, str(root / rel), (h, w), where, xyxy[valid], np.asarray(labels, dtype=np.int64)[valid])
        self.image_ids, self.orig_sizes, self.offsets, self.boxes, self.labels = columns.arrays()
        self.image_paths = columns.paths
        self.records = columns.records
        if any(self.repairs.values()):
            logger.warning("%s: %s", f, self.repairs_summary())

    def repairs_summary(self) -> str:
        """One line of :attr:`repairs` (only the non-zero counts), e.g. ``"3 boxes clipped to the image"``."""
        return repairs_summary(self.repairs)

    def __len__(self) -> int:
        return len(self.image_paths)

    def prompt_for(self, index: int) -> Prompt:
        """The prompt of sample ``index`` (deterministic given seed, epoch and index)."""
        if self.sampler is None:
            return self.prompt
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.sampler(self.labels[lo:hi].tolist(), self.epoch_rng(index))

    def __getitem__(self, index: int) -> GroundingSample:
        check_index(index, len(self), "images")
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        boxes, labels = self.boxes[lo:hi], self.labels[lo:hi]
        prompt = self.prompt_for(index)
        keep = np.asarray([int(lab) in prompt.spans for lab in labels], dtype=bool)
        boxes, labels = boxes[keep], labels[keep]
        image = load_image(self.image_paths[index], record=f"{self.records[index]} ({self.ann_file.name})")
        pixels, tboxes = self.transform(image, torch.from_numpy(np.array(boxes)))
        h, w = (int(v) for v in self.orig_sizes[index])
        return GroundingSample(
            image_id=int(self.image_ids[index]),
            image=pixels,
            caption=prompt.caption,
            boxes=tboxes,
            labels=torch.from_numpy(np.array(labels)),
            tokens_positive=tuple(tuple(s) for s in prompt.tokens_positive(labels.tolist())),
            orig_size=(h, w),
            index=index,
            dataset_name="detection",
        )

    def labels_of(self, index: int) -> np.ndarray:
        """``int64 [N]`` contiguous labels of the boxes of image ``index`` (before any prompt filtering)."""
        return self.labels[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def few_shot_indices(self, shots: int, seed: int = 0) -> list[int]:
        """Images of a ``shots``-shot training subset (the few-shot ODinW protocol, docs/reference/training.md §4.5).

        Images are visited in a seeded random order; an image is taken when one of its classes still has fewer
        than ``shots`` boxes in the subset. Images are kept whole (every box of a taken image stays, as a
        detector cannot train on a partially labelled image), so a class can end with more than ``shots``
        boxes; a class with fewer than ``shots`` boxes in the whole split contributes all of them.

        Args:
            shots: boxes wanted per class (1, 3, 5, 10 in the protocol).
            seed: order of the visit.

        Returns:
            Dataset indices, ascending.
        """
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        counts = dict.fromkeys(self.label_names, 0)
        taken: list[int] = []
        for index in np.random.default_rng(seed).permutation(len(self)).tolist():
            labels = self.labels_of(index).tolist()
            if any(counts[lab] < shots for lab in labels):
                taken.append(index)
                for lab in labels:
                    counts[lab] += 1
        return sorted(taken)

    def category_names(self) -> Mapping[int, str]:
        """Contiguous label → class name (alias of :attr:`label_names`)."""
        return self.label_names
