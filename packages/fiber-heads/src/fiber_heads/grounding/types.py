"""Data containers of the grounding head: targets, raw outputs and detections.

Shape legend: ``B`` batch, ``A`` anchors over all levels, ``L`` padded text length, ``N`` boxes of one image,
``K`` classes/phrases of one prompt, ``D`` detections of one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroundingTargets:
    """Ground truth of a batch for the grounding losses.

    Attributes:
        boxes: one ``float [N_i, 4]`` tensor per image: xyxy boxes ("+1" convention) in the pixel coordinates of
            the (resized, padded) network input.
        positive_maps: one ``float [N_i, L_i]`` tensor per image (``L_i <= L``): which tokens each box's phrase
            covers. Non-zero entries count as positive (the reference binarises normalised rows); a row of
            zeros is allowed (the box still takes part in assignment and regression). Narrower maps are
            zero-padded to ``L``.
    """

    boxes: Sequence[Tensor]
    positive_maps: Sequence[Tensor]

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.positive_maps):
            raise ValueError(
                f"GroundingTargets: {len(self.boxes)} box tensors but {len(self.positive_maps)} positive maps"
            )
        for i, (b, m) in enumerate(zip(self.boxes, self.positive_maps)):
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"GroundingTargets: boxes[{i}] has shape {tuple(b.shape)}, expected [N, 4]")
            if m.dim() != 2 or m.shape[0] != b.shape[0]:
                raise ValueError(
                    f"GroundingTargets: positive_maps[{i}] has shape {tuple(m.shape)}, expected [{b.shape[0]}, L]"
                )

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: torch.device | str) -> GroundingTargets:
        """Copy of the targets on ``device``."""
        return GroundingTargets(
            boxes=[b.to(device) for b in self.boxes], positive_maps=[m.to(device) for m in self.positive_maps]
        )


@dataclass(frozen=True)
class GroundingRawOutput:
    """Dense outputs of :meth:`GroundingHead.forward_raw`, anchors flattened over levels (level-major, then
    row-major over each ``[H_l, W_l]`` map).

    Attributes:
        token_logits: ``[B, A, L]`` token-alignment logits.
        box_regression: ``[B, A, 4]`` box deltas (already multiplied by the per-level scales).
        centerness: ``[B, A]`` centerness logits.
        anchors: ``[A, 4]`` xyxy anchors in input pixels.
        num_anchors_per_level: anchors of each level.
        cls_logits: ``[B, A, num_classes]`` output of the unused ``cls_logits`` layer (checkpoint
            compatibility only; ``None`` when not computed).
    """

    token_logits: Tensor
    box_regression: Tensor
    centerness: Tensor
    anchors: Tensor
    num_anchors_per_level: tuple[int, ...]
    cls_logits: Tensor | None = None


@dataclass(frozen=True)
class GroundingDetections:
    """Detections of one image after post-processing.

    Attributes:
        boxes: ``float [D, 4]`` xyxy boxes ("+1" convention) in original-image pixels.
        scores: ``float [D]`` ``sqrt(class score * sigmoid(centerness))``.
        labels: ``long [D]`` 0-based index of the class/phrase (row of the positive map).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])
