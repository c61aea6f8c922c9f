"""The GLIP-style grounding detector head of the fine FIBER model (docs/reference/training.md §3.1-3.7, §4.7).

``GroundingHead`` composes FPN -> DyHead tower -> predictors (``bbox_pred`` x per-level ``scales``,
``centerness``, the unused ``cls_logits``) and the token-alignment logits, with one anchor per location.
Training computes ATSS targets and the focal / GIoU / centerness losses; :meth:`GroundingHead.predict` runs the
shared detection/grounding post-processing.

State-dict keys map one-to-one onto the official fine checkpoints (see :func:`convert_official_state_dict`):

=========================================== ==========================================
official key                                this module
=========================================== ==========================================
``fusion_backbone.backbone.fpn.<k>``        ``fpn.<k>``
``rpn.head.dot_product_projection_text.*``  ``token_alignment.dot_product_projection_text.*``
``rpn.head.{bias_lang,bias0,log_scale}``    ``token_alignment.{bias_lang,bias0,log_scale}``
``rpn.head.<k>`` (tower, predictors)        ``<k>``
``rpn.anchor_generator.cell_anchors.<l>``   ``anchor_generator.cell_anchors.<l>``
=========================================== ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from fiber_heads.grounding.anchors import DEFAULT_ANCHOR_SIZES, DEFAULT_ANCHOR_STRIDES, AnchorGenerator
from fiber_heads.grounding.box_coder import BoxCoder
from fiber_heads.grounding.dyhead import DyHeadTower, OffsetMode
from fiber_heads.grounding.fpn import FPN
from fiber_heads.grounding.losses import ReduceFn, grounding_losses
from fiber_heads.grounding.postprocess import PostprocessConfig, postprocess_detections
from fiber_heads.grounding.token_alignment import TokenAlignment
from fiber_heads.grounding.types import GroundingDetections, GroundingRawOutput, GroundingTargets
from fiber_heads.types import HeadOutput

_TOKEN_ALIGNMENT_KEYS = ("dot_product_projection_text.", "bias_lang", "bias0", "log_scale")


class Scale(nn.Module):
    """A learnable scalar multiplier (official ``scales.{l}.scale``, init 1.0)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor) -> Tensor:
        """``x * scale``."""
        return x * self.scale


class _PyramidImage(Protocol):
    @property
    def pyramid(self) -> Sequence[Tensor]: ...


class _Text(Protocol):
    @property
    def hidden(self) -> Tensor: ...

    @property
    def mask(self) -> Tensor: ...


class GroundingFeatures(Protocol):
    """What :meth:`GroundingHead.forward_features` reads from a fused backbone output
    (``fiber_backbones.FusionOutput`` satisfies it): ``image.pyramid`` (NCHW maps, the last three are used)
    and ``text.hidden [B, L, C_txt]`` / ``text.mask [B, L]``."""

    @property
    def image(self) -> _PyramidImage: ...

    @property
    def text(self) -> _Text | None: ...


class GroundingHead(nn.Module):
    """FPN + DyHead + token-alignment grounding detector head.

    Args:
        in_channels_list: channels of the three backbone maps (strides 8/16/32); FIBER-B ``(256, 512, 1024)``.
        text_dim: width of the text hidden states (768).
        num_convs: DyHead blocks (6).
        channels: FPN / tower width (256).
        num_classes: output width of the unused ``cls_logits`` layer (80 in the released checkpoints).
        anchor_sizes: anchor side per level.
        anchor_strides: stride per level (P3..P7).
        num_groups: GroupNorm groups in the tower (16).
        prior_prob: prior probability for the ``cls_logits`` bias and ``bias0`` (0.01).
        drop_block_prob: FPN DropBlock probability (0.3 in the reference; 0 disables).
        drop_block_size: FPN DropBlock block size (3).
        offset_mode: DyHead offset handling for the coarser level (``"compat"`` reproduces the reference).
        grad_checkpointing: checkpoint the DyHead tower per block.
        topk: ATSS candidates per level (9).
        focal_alpha: focal-loss ``alpha`` (0.25).
        focal_gamma: focal-loss ``gamma`` (2.0).
        reg_loss_weight: weight of the GIoU loss (2.0).
        unmatched_last_token: compat: background anchors target the last token column (see
            :func:`~fiber_heads.grounding.losses.build_anchor_targets`).
        reduce_mean: mean of a scalar over ranks, injected by the trainer (identity when ``None``).
    """

    def __init__(
        self,
        in_channels_list: Sequence[int] = (256, 512, 1024),
        text_dim: int = 768,
        num_convs: int = 6,
        *,
        channels: int = 256,
        num_classes: int = 80,
        anchor_sizes: Sequence[float] = DEFAULT_ANCHOR_SIZES,
        anchor_strides: Sequence[int] = DEFAULT_ANCHOR_STRIDES,
        num_groups: int = 16,
        prior_prob: float = 0.01,
        drop_block_prob: float = 0.3,
        drop_block_size: int = 3,
        offset_mode: OffsetMode = "compat",
        grad_checkpointing: bool = False,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 2.0,
        unmatched_last_token: bool = False,
        reduce_mean: ReduceFn | None = None,
    ) -> None:
        super().__init__()
        if len(anchor_sizes) != 5 or len(anchor_strides) != 5:
            raise ValueError("GroundingHead: anchor_sizes and anchor_strides need one entry per level P3..P7")
        self.fpn = FPN(in_channels_list, channels, drop_block_prob, drop_block_size)
        self.dyhead_tower = DyHeadTower(num_convs, channels, num_groups, offset_mode, grad_checkpointing)
        self.cls_logits = nn.Conv2d(channels, num_classes, 1)
        self.bbox_pred = nn.Conv2d(channels, 4, 1)
        self.centerness = nn.Conv2d(channels, 1, 1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            assert conv.bias is not None  # nn.Conv2d's default bias=True
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        assert self.cls_logits.bias is not None
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(5)])
        self.token_alignment = TokenAlignment(channels, text_dim, prior_prob)
        self.anchor_generator = AnchorGenerator(anchor_sizes, anchor_strides)
        self.box_coder = BoxCoder()
        self.text_dim = text_dim
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.unmatched_last_token = unmatched_last_token
        self.reduce_mean: ReduceFn | None = reduce_mean

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Enable or disable per-block gradient checkpointing of the DyHead tower."""
        self.dyhead_tower.grad_checkpointing = enabled

    def forward_raw(self, pyramid: Sequence[Tensor], text_hidden: Tensor, text_mask: Tensor) -> GroundingRawOutput:
        """Dense predictions for every anchor.

        Args:
            pyramid: three backbone maps ``[B, C_s, H_s, W_s]`` at strides 8, 16, 32.
            text_hidden: ``[B, L, C_txt]`` text hidden states of the fused backbone.
            text_mask: ``[B, L]`` attention mask (``True``/1 for real tokens).

        Returns:
            The :class:`GroundingRawOutput` (``cls_logits`` only in training mode).
        """
        if text_hidden.dim() != 3 or text_hidden.shape[-1] != self.text_dim:
            raise ValueError(
                f"GroundingHead: text_hidden has shape {tuple(text_hidden.shape)}, expected [B, L, {self.text_dim}]"
            )
        if text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(
                f"GroundingHead: text_mask has shape {tuple(text_mask.shape)}, expected {tuple(text_hidden.shape[:2])}"
            )
        if pyramid[0].shape[0] != text_hidden.shape[0]:
            raise ValueError(
                f"GroundingHead: {pyramid[0].shape[0]} images but {text_hidden.shape[0]} texts in the batch"
            )
        levels = self.dyhead_tower(self.fpn(pyramid))
        feats: list[Tensor] = []
        boxes: list[Tensor] = []
        ctrs: list[Tensor] = []
        cls: list[Tensor] = []
        for x, scale in zip(levels, self.scales):
            # [B, C, H, W] -> [B, H*W, C], row-major like the anchors.
            feats.append(x.flatten(2).transpose(1, 2))
            boxes.append(scale(self.bbox_pred(x)).flatten(2).transpose(1, 2))
            ctrs.append(self.centerness(x).flatten(1))
            if self.training:
                cls.append(self.cls_logits(x).flatten(2).transpose(1, 2))
        anchors, counts = self.anchor_generator([(x.shape[-2], x.shape[-1]) for x in levels])
        token_logits = self.token_alignment(torch.cat(feats, dim=1), text_hidden, text_mask)
        return GroundingRawOutput(
            token_logits=token_logits,
            box_regression=torch.cat(boxes, dim=1),
            centerness=torch.cat(ctrs, dim=1),
            anchors=anchors,
            num_anchors_per_level=tuple(counts),
            cls_logits=torch.cat(cls, dim=1) if cls else None,
        )

    def forward(
        self,
        pyramid: Sequence[Tensor],
        text_hidden: Tensor,
        text_mask: Tensor,
        targets: GroundingTargets | None = None,
    ) -> HeadOutput:
        """Dense predictions and, with ``targets``, the training loss.

        Args:
            pyramid: three backbone maps ``[B, C_s, H_s, W_s]`` at strides 8, 16, 32.
            text_hidden: ``[B, L, C_txt]`` text hidden states.
            text_mask: ``[B, L]`` attention mask.
            targets: ground truth of the batch (boxes in input pixels of the padded batch), or ``None``.

        Returns:
            :class:`~fiber_heads.types.HeadOutput` with ``loss = token + reg + centerness`` (``None`` without
            targets), ``logits`` = ``{"token_logits" [B, A, L], "box_regression" [B, A, 4], "centerness" [B, A],
            "anchors" [A, 4]}`` and ``logs`` = ``{"grounding/loss_token", "grounding/loss_reg",
            "grounding/loss_centerness", "grounding/num_pos"}``.
        """
        raw = self.forward_raw(pyramid, text_hidden, text_mask)
        logits: Mapping[str, Tensor] = {
            "token_logits": raw.token_logits,
            "box_regression": raw.box_regression,
            "centerness": raw.centerness,
            "anchors": raw.anchors,
        }
        if targets is None:
            return HeadOutput(loss=None, logits=logits)
        losses = grounding_losses(
            raw.token_logits,
            raw.box_regression,
            raw.centerness,
            raw.anchors,
            raw.num_anchors_per_level,
            targets,
            text_mask,
            box_coder=self.box_coder,
            topk=self.topk,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            reg_loss_weight=self.reg_loss_weight,
            reduce_mean=self.reduce_mean,
            unmatched_last_token=self.unmatched_last_token,
        )
        loss = losses.total
        if raw.cls_logits is not None:
            # The reference keeps cls_logits in the graph with weight 0 (no unused parameters under DDP).
            loss = loss + 0.0 * raw.cls_logits.sum()
        logs = {
            "grounding/loss_token": losses.token.detach(),
            "grounding/loss_reg": losses.reg.detach(),
            "grounding/loss_centerness": losses.centerness.detach(),
            "grounding/num_pos": losses.num_pos.float(),
        }
        return HeadOutput(loss=loss, logits=logits, logs=logs)

    def forward_features(self, features: GroundingFeatures, targets: GroundingTargets | None = None) -> HeadOutput:
        """:meth:`forward` on a fused backbone output (last three ``image.pyramid`` maps, ``text.hidden/mask``)."""
        if features.text is None:
            raise ValueError("GroundingHead.forward_features: the backbone output has no text features")
        return self.forward(list(features.image.pyramid)[-3:], features.text.hidden, features.text.mask, targets)

    @torch.no_grad()
    def predict(
        self,
        pyramid: Sequence[Tensor],
        text_hidden: Tensor,
        text_mask: Tensor,
        positive_maps: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor | None = None,
        config: PostprocessConfig | None = None,
    ) -> list[GroundingDetections]:
        """Detections per image for the classes/phrases of ``positive_maps``.

        Args:
            pyramid: three backbone maps at strides 8, 16, 32.
            text_hidden: ``[B, L, C_txt]`` text hidden states.
            text_mask: ``[B, L]`` attention mask.
            positive_maps: ``[B, K, L']`` (``L' <= L``) token map of each class/phrase; all-zero rows are padding.
            image_sizes: ``[B, 2]`` ``(height, width)`` of each resized image before batch padding.
            original_sizes: ``[B, 2]`` ``(height, width)`` of the original images (boxes are rescaled to them);
                ``None`` keeps input coordinates.
            config: post-processing thresholds (detection defaults when ``None``).

        Returns:
            One :class:`GroundingDetections` per image (labels index the rows of ``positive_maps``).
        """
        raw = self.forward_raw(pyramid, text_hidden, text_mask)
        return postprocess_detections(
            raw.token_logits,
            raw.box_regression,
            raw.centerness,
            raw.anchors,
            raw.num_anchors_per_level,
            positive_maps,
            image_sizes,
            original_sizes,
            config=config,
            box_coder=self.box_coder,
        )


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], *, strict: bool = False
) -> tuple[dict[str, Tensor], list[str]]:
    """Extract and rename the head entries of an official fine checkpoint (docs/reference/architecture.md §13.2).

    Args:
        state_dict: the official ``model`` entry (a leading ``module.`` prefix is stripped).
        strict: raise if a ``rpn.*`` / FPN key is not recognised.

    Returns:
        ``(head_state_dict, skipped)``: the renamed entries for :class:`GroundingHead`, and the original keys
        that were not head keys (the backbone, which another converter handles).
    """
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        k = key.removeprefix("module.")
        if k.startswith("fusion_backbone.backbone.fpn."):
            out["fpn." + k.removeprefix("fusion_backbone.backbone.fpn.")] = value
        elif k.startswith("rpn.anchor_generator."):
            out["anchor_generator." + k.removeprefix("rpn.anchor_generator.")] = value
        elif k.startswith("rpn.head."):
            rest = k.removeprefix("rpn.head.")
            out[("token_alignment." + rest) if rest.startswith(_TOKEN_ALIGNMENT_KEYS) else rest] = value
        elif k.startswith("rpn.") and strict:
            raise KeyError(f"convert_official_state_dict: unrecognised detector key {key!r}")
        else:
            skipped.append(key)
    return out, skipped
