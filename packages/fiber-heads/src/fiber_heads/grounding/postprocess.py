"""Shared detection / grounding inference (docs/reference/training.md §4.7), as pure functions on tensors.

A prompt's classes (detection) or phrases (grounding) are rows of a positive map ``[K, L]`` over its tokens.
For image ``b``, anchor ``a`` and class ``k``:

1. class score ``s_ak`` = mean over the class's tokens of ``sigmoid(z_aj)``;
2. candidates: ``s_ak > pre_nms_thresh``; per level, the ``pre_nms_top_n`` best by ``s_ak * sigmoid(ctr_a)``;
3. final score ``sqrt(s_ak * sigmoid(ctr_a))``; boxes decoded by the box coder and clipped to the image
   (``[0, W - 1] x [0, H - 1]``, "+1" convention; empty boxes are kept);
4. class-wise NMS at IoU 0.6 (over all levels), then the best ``detections_per_img`` per image (ties at the
   cut-off kept);
5. boxes rescaled to the original image size.

The reference NMS uses "+1" areas; ``torchvision.ops.batched_nms`` uses continuous areas, so with
``plus_one_nms`` the boxes are shifted by ``+1`` on ``x2``/``y2`` for the NMS only, which gives exactly the
"+1" IoU. Labels are 0-based row indices of the positive map (the reference counts from 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from fiber_heads.grounding.box_coder import BoxCoder
from fiber_heads.grounding.types import GroundingDetections


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds of the detection/grounding post-processing.

    Attributes:
        pre_nms_thresh: class-score threshold of candidates (0.05; 0.0 for referring expressions).
        pre_nms_top_n: candidates kept per level and image (1000; 3000 for referring expressions).
        nms_thresh: IoU threshold of the class-wise NMS (0.6).
        detections_per_img: detections kept per image (100; 300 for LVIS), ties at the cut-off kept.
        plus_one_nms: use "+1" box areas in the NMS, as the reference.
    """

    pre_nms_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    plus_one_nms: bool = True

    @classmethod
    def referring_expressions(cls) -> PostprocessConfig:
        """Settings for RefCOCO/+/g (docs/reference/training.md §4.4): threshold 0.0, 3000 candidates per level."""
        return cls(pre_nms_thresh=0.0, pre_nms_top_n=3000)

    @classmethod
    def lvis(cls) -> PostprocessConfig:
        """Settings for LVIS: 300 detections per image."""
        return cls(detections_per_img=300)


def class_scores(token_logits: Tensor, positive_maps: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token probability of every class.

    Args:
        token_logits: ``[B, A, L]`` token logits.
        positive_maps: ``[B, K, L']`` (``L' <= L``) class -> token maps; non-zero entries mark the class's tokens.

    Returns:
        ``scores [B, A, K]`` (``0`` for classes without tokens) and ``valid [B, K]`` (classes with >= 1 token).
    """
    b, _, length = token_logits.shape
    if positive_maps.dim() != 3 or positive_maps.shape[0] != b or positive_maps.shape[2] > length:
        raise ValueError(
            f"class_scores: positive_maps has shape {tuple(positive_maps.shape)}, expected [{b}, K, <= {length}]"
        )
    pm = F.pad((positive_maps != 0).to(token_logits.dtype), (0, length - positive_maps.shape[2]))
    counts = pm.sum(dim=-1)  # [B, K]
    scores = torch.bmm(token_logits.sigmoid(), pm.transpose(1, 2)) / counts.clamp(min=1.0).unsqueeze(1)
    return scores, counts > 0


def _rescale(boxes: Tensor, from_hw: Tensor, to_hw: Tensor) -> Tensor:
    ratio_h = to_hw[0].to(boxes.dtype) / from_hw[0].to(boxes.dtype)
    ratio_w = to_hw[1].to(boxes.dtype) / from_hw[1].to(boxes.dtype)
    return boxes * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))


@torch.no_grad()
def postprocess_detections(
    token_logits: Tensor,
    box_regression: Tensor,
    centerness: Tensor,
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    positive_maps: Tensor,
    image_sizes: Tensor,
    original_sizes: Tensor | None = None,
    *,
    config: PostprocessConfig | None = None,
    box_coder: BoxCoder | None = None,
) -> list[GroundingDetections]:
    """Turn dense head outputs into per-image detections (see the module docstring).

    Args:
        token_logits: ``[B, A, L]`` token logits.
        box_regression: ``[B, A, 4]`` box deltas.
        centerness: ``[B, A]`` centerness logits.
        anchors: ``[A, 4]`` anchors.
        num_anchors_per_level: anchors of each level (sums to ``A``).
        positive_maps: ``[B, K, L']`` class/phrase -> token maps, zero rows for padding classes.
        image_sizes: ``[B, 2]`` ``(height, width)`` of each resized input image (before batch padding).
        original_sizes: ``[B, 2]`` ``(height, width)`` to rescale boxes to; ``None`` keeps input coordinates.
        config: thresholds (defaults when ``None``).
        box_coder: the coder of the deltas (defaults when ``None``).

    Returns:
        One :class:`GroundingDetections` per image, sorted by descending score.
    """
    cfg = config or PostprocessConfig()
    coder = box_coder or BoxCoder()
    if sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError("postprocess_detections: num_anchors_per_level does not sum to the number of anchors")
    b = token_logits.shape[0]
    if image_sizes.shape != (b, 2):
        raise ValueError(f"postprocess_detections: image_sizes has shape {tuple(image_sizes.shape)}, expected [B, 2]")
    scores, valid = class_scores(token_logits.float(), positive_maps)
    scores = scores.masked_fill(~valid.unsqueeze(1), -1.0)  # classes without tokens never become candidates
    ctr = centerness.float().sigmoid()
    results: list[GroundingDetections] = []
    for i in range(b):
        all_boxes: list[Tensor] = []
        all_scores: list[Tensor] = []
        all_labels: list[Tensor] = []
        start = 0
        for count in num_anchors_per_level:
            s = scores[i, start : start + count]  # [A_l, K]
            cand = s > cfg.pre_nms_thresh
            combined = (s * ctr[i, start : start + count, None])[cand]
            n = min(int(combined.numel()), cfg.pre_nms_top_n)
            if n > 0:
                top, idx = combined.topk(n, sorted=False)
                nz = cand.nonzero()[idx]  # [n, 2] (anchor within level, class)
                a_idx = nz[:, 0] + start
                all_boxes.append(coder.decode(box_regression[i, a_idx].float(), anchors[a_idx]))
                all_scores.append(top.sqrt())
                all_labels.append(nz[:, 1])
            start += count
        if not all_boxes:
            empty = token_logits.new_zeros((0,), dtype=torch.float32)
            results.append(GroundingDetections(empty.view(0, 4), empty, empty.long()))
            continue
        boxes = torch.cat(all_boxes)
        det_scores = torch.cat(all_scores)
        labels = torch.cat(all_labels)
        h, w = (float(v) for v in image_sizes[i].tolist())
        boxes = torch.stack(
            (
                boxes[:, 0].clamp(0, w - 1),
                boxes[:, 1].clamp(0, h - 1),
                boxes[:, 2].clamp(0, w - 1),
                boxes[:, 3].clamp(0, h - 1),
            ),
            dim=1,
        )
        nms_boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) if cfg.plus_one_nms else boxes
        keep = batched_nms(nms_boxes, det_scores, labels, cfg.nms_thresh)  # sorted by decreasing score
        boxes, det_scores, labels = boxes[keep], det_scores[keep], labels[keep]
        if det_scores.numel() > cfg.detections_per_img:
            kth = det_scores.numel() - cfg.detections_per_img + 1
            threshold = det_scores.kthvalue(kth).values
            sel = det_scores >= threshold
            boxes, det_scores, labels = boxes[sel], det_scores[sel], labels[sel]
        if original_sizes is not None:
            boxes = _rescale(boxes, image_sizes[i], original_sizes[i])
        results.append(GroundingDetections(boxes, det_scores, labels))
    return results


def boxes_per_label(detections: GroundingDetections, num_labels: int) -> list[Tensor]:
    """Group an image's detections by label, each group sorted by descending score.

    Used for phrase grounding (one ranked list per phrase, Flickr30k Entities) and referring expressions
    (the first box of label 0 is the answer).

    Args:
        detections: detections of one image.
        num_labels: number of classes/phrases ``K`` of the prompt.

    Returns:
        ``K`` tensors ``[K_p, 4]`` (possibly empty).
    """
    out: list[Tensor] = []
    for k in range(num_labels):
        sel = detections.labels == k
        order = detections.scores[sel].argsort(descending=True, stable=True)
        out.append(detections.boxes[sel][order])
    return out
