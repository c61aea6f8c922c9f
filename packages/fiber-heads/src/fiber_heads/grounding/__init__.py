"""GLIP-style grounding detector head of the fine FIBER model (docs/reference/training.md §3 and §4.7).

Pure PyTorch + ``torchvision.ops``: FPN, DyHead tower (modulated deformable convs via
``torchvision.ops.deform_conv2d``), one anchor per location, ATSS assignment, token-alignment logits, focal /
GIoU / centerness losses, and detection/grounding post-processing.

Example::

    head = GroundingHead(in_channels_list=(256, 512, 1024), text_dim=768)
    out = head(pyramid, text_hidden, text_mask, GroundingTargets(boxes=[...], positive_maps=[...]))
    out.loss.backward()
    dets = head.predict(pyramid, text_hidden, text_mask, positive_maps, image_sizes, original_sizes)
"""

from __future__ import annotations

from fiber_heads.grounding.anchors import AnchorGenerator, cell_anchor
from fiber_heads.grounding.atss import atss_assign
from fiber_heads.grounding.box_coder import BoxCoder, box_iou_plus_one
from fiber_heads.grounding.dyhead import DeformConvNorm, DyHeadBlock, DyHeadTower, DyReLU, ModulatedDeformConv3x3
from fiber_heads.grounding.fpn import FPN, DropBlock2d, LastLevelP6P7
from fiber_heads.grounding.head import GroundingFeatures, GroundingHead, Scale, convert_official_state_dict
from fiber_heads.grounding.losses import (
    AnchorTargets,
    GroundingLosses,
    ReduceFn,
    build_anchor_targets,
    centerness_targets,
    giou_loss,
    grounding_losses,
    identity_reduce,
    should_skip_batch,
    token_focal_loss,
)
from fiber_heads.grounding.postprocess import (
    PostprocessConfig,
    boxes_per_label,
    class_scores,
    postprocess_detections,
)
from fiber_heads.grounding.token_alignment import TokenAlignment
from fiber_heads.grounding.types import GroundingDetections, GroundingRawOutput, GroundingTargets

__all__ = [
    "FPN",
    "AnchorGenerator",
    "AnchorTargets",
    "BoxCoder",
    "DeformConvNorm",
    "DropBlock2d",
    "DyHeadBlock",
    "DyHeadTower",
    "DyReLU",
    "GroundingDetections",
    "GroundingFeatures",
    "GroundingHead",
    "GroundingLosses",
    "GroundingRawOutput",
    "GroundingTargets",
    "LastLevelP6P7",
    "ModulatedDeformConv3x3",
    "PostprocessConfig",
    "ReduceFn",
    "Scale",
    "TokenAlignment",
    "atss_assign",
    "box_iou_plus_one",
    "boxes_per_label",
    "build_anchor_targets",
    "cell_anchor",
    "centerness_targets",
    "class_scores",
    "convert_official_state_dict",
    "giou_loss",
    "grounding_losses",
    "identity_reduce",
    "postprocess_detections",
    "should_skip_batch",
    "token_focal_loss",
]
