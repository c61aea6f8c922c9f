"""Losses of the fine-grained detector (docs/reference/training.md §3.6-3.7).

With ``N_pos`` the number of positive anchors averaged over ranks (at least 1) and ``S_ctr`` the sum of the
centerness targets averaged over ranks:

* token loss: sigmoid focal loss (alpha 0.25, gamma 2) summed over every (anchor, real token) pair, padding
  tokens excluded, divided by ``N_pos``;
* regression: ``2 * sum_pos ctr * (1 - GIoU(decode(pred), decode(target))) / S_ctr``;
* centerness: ``BCEWithLogits(sum over positives) / N_pos``.

All computations run in fp32. The cross-rank averages come from an injected ``reduce_mean`` callable (the
identity on a single process), so this module never touches ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from fiber_heads.grounding.atss import atss_assign, box_centres
from fiber_heads.grounding.box_coder import BoxCoder
from fiber_heads.grounding.types import GroundingTargets

ReduceFn = Callable[[Tensor], Tensor]
"""Mean of a tensor over all ranks (e.g. ``all_reduce(SUM) / world_size``); identity on one process."""


def identity_reduce(x: Tensor) -> Tensor:
    """The single-process :data:`ReduceFn`."""
    return x


def should_skip_batch(targets: GroundingTargets, max_empty_fraction: float = 0.1) -> bool:
    """The reference's batch filter (docs/reference/training.md §3.7): skip a rank's batch before the forward pass when every
    image has no box, or when more than ``max_empty_fraction`` of its images have no box.

    Args:
        targets: the batch's ground truth.
        max_empty_fraction: largest tolerated fraction of box-less images (0.1).

    Returns:
        ``True`` if the batch should be skipped.
    """
    n = len(targets)
    empty = sum(int(b.shape[0] == 0) for b in targets.boxes)
    return n == 0 or empty == n or empty > max_empty_fraction * n


@dataclass(frozen=True)
class AnchorTargets:
    """Per-anchor training targets of a batch.

    Attributes:
        token_targets: ``float [B, A, L]`` binary token targets (all zero for background anchors, unless the
            compat option puts a 1 on the last column).
        box_targets: ``float [B, A, 4]`` xyxy boxes of the matched ground truth (zeros for background).
        matched: ``long [B, A]`` index of the matched box in its image, ``-1`` for background.
    """

    token_targets: Tensor
    box_targets: Tensor
    matched: Tensor

    @property
    def positive(self) -> Tensor:
        """``bool [B, A]`` positive anchors."""
        return self.matched >= 0


@torch.no_grad()
def build_anchor_targets(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    targets: GroundingTargets,
    text_length: int,
    *,
    topk: int = 9,
    unmatched_last_token: bool = False,
) -> AnchorTargets:
    """Assign anchors with ATSS and gather their token and box targets.

    Args:
        anchors: ``[A, 4]`` anchors of all levels.
        num_anchors_per_level: anchors of each level.
        targets: boxes and positive maps of the ``B`` images.
        text_length: padded text length ``L`` of the batch.
        topk: ATSS candidates per level.
        unmatched_last_token: compat mode: background anchors get a one-hot target on token ``L - 1`` (the
            reference behaviour, which only matters when the text fills all ``L`` positions).

    Returns:
        The :class:`AnchorTargets` of the batch.

    Raises:
        ValueError: if a positive map is wider than ``text_length``.
    """
    token_targets: list[Tensor] = []
    box_targets: list[Tensor] = []
    matched_all: list[Tensor] = []
    num_anchors = anchors.shape[0]
    for i, (boxes, pmap) in enumerate(zip(targets.boxes, targets.positive_maps)):
        if pmap.shape[1] > text_length:
            raise ValueError(
                f"build_anchor_targets: positive_maps[{i}] has {pmap.shape[1]} columns but the text has "
                f"{text_length} tokens"
            )
        boxes = boxes.to(anchors.device, torch.float32)
        pmap = F.pad((pmap.to(anchors.device) != 0).float(), (0, text_length - pmap.shape[1]))
        matched, _ = atss_assign(anchors, num_anchors_per_level, boxes, topk=topk)
        pos = matched >= 0
        safe = matched.clamp(min=0)
        tok = torch.zeros(num_anchors, text_length, device=anchors.device)
        box = torch.zeros(num_anchors, 4, device=anchors.device)
        if boxes.shape[0] > 0:
            tok = torch.where(pos[:, None], pmap[safe], tok)
            box = torch.where(pos[:, None], boxes[safe], box)
        if unmatched_last_token:
            tok[~pos, -1] = 1.0
        token_targets.append(tok)
        box_targets.append(box)
        matched_all.append(matched)
    return AnchorTargets(torch.stack(token_targets), torch.stack(box_targets), torch.stack(matched_all))


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """``sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b))`` for anchor centres inside ``boxes``.

    Args:
        anchors: ``[P, 4]`` xyxy anchors.
        boxes: ``[P, 4]`` xyxy target boxes (one per anchor).

    Returns:
        ``[P]`` centerness targets in ``[0, 1]``.
    """
    ctr = box_centres(anchors)
    lr = torch.stack((ctr[:, 0] - boxes[:, 0], boxes[:, 2] - ctr[:, 0]), dim=1)
    tb = torch.stack((ctr[:, 1] - boxes[:, 1], boxes[:, 3] - ctr[:, 1]), dim=1)
    ratio = (lr.amin(dim=1) / lr.amax(dim=1)) * (tb.amin(dim=1) / tb.amax(dim=1))
    return torch.sqrt(ratio)


def giou_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Summed ``1 - GIoU`` between predicted and target boxes, the reference variant.

    Predicted ``x2``/``y2`` are clamped to at least ``x1``/``y1``; areas, intersection and enclosing box use the
    continuous formula (no "+1"), with ``1e-7`` added to the union and to the enclosing area.

    Args:
        pred: ``[P, 4]`` xyxy predicted boxes.
        target: ``[P, 4]`` xyxy target boxes.
        weight: optional ``[P]`` per-box weights.

    Returns:
        Scalar ``sum(weight * (1 - GIoU))``.
    """
    px1, py1 = pred[:, 0], pred[:, 1]
    px2 = torch.maximum(pred[:, 2], px1)
    py2 = torch.maximum(pred[:, 3], py1)
    tx1, ty1, tx2, ty2 = target.unbind(dim=1)
    pred_area = (px2 - px1) * (py2 - py1)
    target_area = (tx2 - tx1) * (ty2 - ty1)
    inter = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0) * (
        torch.minimum(py2, ty2) - torch.maximum(py1, ty1)
    ).clamp(min=0)
    enclose = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) * (
        torch.maximum(py2, ty2) - torch.minimum(py1, ty1)
    ) + 1e-7
    union = pred_area + target_area - inter + 1e-7
    giou = inter / union - (enclose - union) / enclose
    losses = 1.0 - giou
    if weight is not None:
        losses = losses * weight
    return losses.sum()


def token_focal_loss(
    logits: Tensor, targets: Tensor, text_mask: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss summed over every (anchor, real token) pair.

    Args:
        logits: ``[B, A, L]`` token logits.
        targets: ``[B, A, L]`` binary targets.
        text_mask: ``[B, L]`` attention mask; padding tokens (0/False) contribute nothing.
        alpha: focal ``alpha`` (weight of positives).
        gamma: focal ``gamma``.

    Returns:
        Scalar sum (not normalised).
    """
    valid = (text_mask != 0).unsqueeze(1).expand_as(logits)
    # Select instead of multiplying by the mask, so that non-finite logits on padding cannot leak in.
    return sigmoid_focal_loss(logits[valid], targets[valid], alpha=alpha, gamma=gamma, reduction="sum")


@dataclass(frozen=True)
class GroundingLosses:
    """The three loss terms (scalars, fp32) and the positive count of this rank.

    Attributes:
        token: normalised focal loss.
        reg: normalised, weighted GIoU loss.
        centerness: normalised centerness BCE.
        num_pos: number of positive anchors on this rank (detached).
    """

    token: Tensor
    reg: Tensor
    centerness: Tensor
    num_pos: Tensor

    @property
    def total(self) -> Tensor:
        """``token + reg + centerness``."""
        return self.token + self.reg + self.centerness


def grounding_losses(
    token_logits: Tensor,
    box_regression: Tensor,
    centerness: Tensor,
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    targets: GroundingTargets,
    text_mask: Tensor,
    *,
    box_coder: BoxCoder | None = None,
    topk: int = 9,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    reg_loss_weight: float = 2.0,
    reduce_mean: ReduceFn | None = None,
    unmatched_last_token: bool = False,
) -> GroundingLosses:
    """ATSS assignment plus the three grounding losses of docs/reference/training.md §3.7.

    Args:
        token_logits: ``[B, A, L]`` token-alignment logits.
        box_regression: ``[B, A, 4]`` predicted deltas.
        centerness: ``[B, A]`` centerness logits.
        anchors: ``[A, 4]`` anchors.
        num_anchors_per_level: anchors of each level.
        targets: ground truth of the ``B`` images.
        text_mask: ``[B, L]`` attention mask.
        box_coder: the coder of the deltas (default weights when ``None``).
        topk: ATSS candidates per level.
        focal_alpha: focal ``alpha``.
        focal_gamma: focal ``gamma``.
        reg_loss_weight: weight of the GIoU term (2.0).
        reduce_mean: mean over ranks of a scalar tensor (identity when ``None``).
        unmatched_last_token: see :func:`build_anchor_targets`.

    Returns:
        The :class:`GroundingLosses`.
    """
    b, _, length = token_logits.shape
    if len(targets) != b:
        raise ValueError(f"grounding_losses: {len(targets)} targets for a batch of {b} images")
    if text_mask.shape != (b, length):
        raise ValueError(f"grounding_losses: text_mask has shape {tuple(text_mask.shape)}, expected {(b, length)}")
    coder = box_coder or BoxCoder()
    reduce = reduce_mean or identity_reduce
    token_logits = token_logits.float()
    box_regression = box_regression.float()
    centerness = centerness.float()
    anchors = anchors.float()

    at = build_anchor_targets(
        anchors, num_anchors_per_level, targets, length, topk=topk, unmatched_last_token=unmatched_last_token
    )
    pos = at.positive
    num_pos = pos.sum()
    num_pos_avg = reduce(num_pos.float()).clamp(min=1.0)

    token_loss = token_focal_loss(token_logits, at.token_targets, text_mask, focal_alpha, focal_gamma) / num_pos_avg

    if int(num_pos) == 0:
        zero = box_regression.sum() * 0.0 + centerness.sum() * 0.0
        # Participate in the collective anyway so that every rank issues the same calls.
        reduce(zero.detach())
        return GroundingLosses(token_loss, zero, zero.clone(), num_pos.detach())

    pos_anchors = anchors.unsqueeze(0).expand(b, -1, -1)[pos]  # [P, 4]
    # The reference decodes the *encoded* targets (so the coder's clamp applies to both sides).
    target_boxes = coder.decode(coder.encode(at.box_targets[pos], pos_anchors), pos_anchors)
    pred_boxes = coder.decode(box_regression[pos], pos_anchors)
    ctr_targets = centerness_targets(pos_anchors, target_boxes)
    ctr_sum_avg = reduce(ctr_targets.sum())

    reg_loss = reg_loss_weight * giou_loss(pred_boxes, target_boxes, ctr_targets) / ctr_sum_avg
    ctr_loss = F.binary_cross_entropy_with_logits(centerness[pos], ctr_targets, reduction="sum") / num_pos_avg
    return GroundingLosses(token_loss, reg_loss, ctr_loss, num_pos.detach())
