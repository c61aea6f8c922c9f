"""Fine FIBER: fusion backbone (fine variant) + the GLIP-style grounding head (docs/reference/architecture.md §9,
docs/reference/training.md §3.1, §4.7): detection, phrase grounding and referring expressions share :meth:`GroundingModel.predict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from torch import Tensor

from fiber_backbones import FusionBackbone, TextInputs
from fiber_heads.grounding import (
    GroundingDetections,
    GroundingHead,
    GroundingTargets,
    PostprocessConfig,
    should_skip_batch,
)
from fiber_heads.grounding.dyhead import OffsetMode
from fiber_models.outputs import StepOutput
from fiber_models.pretrained import FiberPreTrainedModel

__all__ = ["EMA_WEIGHTS", "GroundingHeadConfig", "GroundingModel", "build_grounding_head", "distributed_mean"]

EMA_WEIGHTS = "ema.safetensors"
"""Extra file of a saved grounding model trained with EMA: the full state dict with the EMA weights."""


@dataclass(frozen=True)
class GroundingHeadConfig:
    """Geometry and loss settings of the grounding head (docs/reference/training.md §3.2-§3.7).

    Args:
        channels: FPN / DyHead width (256).
        num_convs: DyHead blocks (6).
        num_classes: width of the unused ``cls_logits`` layer (80 in the released checkpoints).
        anchor_sizes: anchor side per level P3..P7 (64 ... 1024 = 8 x stride).
        anchor_strides: strides of P3..P7.
        num_groups: GroupNorm groups of the tower (16; must divide ``channels``).
        drop_block_prob / drop_block_size: FPN DropBlock (0.3, 3; training only).
        offset_mode: DyHead offsets of the coarser level: ``"compat"`` (reference layout quirk) or ``"resize"``.
        grad_checkpointing: checkpoint the DyHead tower per block (memory only).
        topk: ATSS candidates per level (9).
        focal_alpha / focal_gamma: token focal loss (0.25, 2).
        reg_loss_weight: GIoU loss weight (2.0).
        unmatched_last_token: compat mode of the background token target (§3.6).
        max_empty_fraction: skip a batch where more than this fraction of images has no box (0.1, §3.7).
    """

    channels: int = 256
    num_convs: int = 6
    num_classes: int = 80
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0, 1024.0)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    num_groups: int = 16
    drop_block_prob: float = 0.3
    drop_block_size: int = 3
    offset_mode: str = "compat"
    grad_checkpointing: bool = False
    topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0
    unmatched_last_token: bool = False
    max_empty_fraction: float = 0.1

    def __post_init__(self) -> None:
        if len(self.anchor_sizes) != 5 or len(self.anchor_strides) != 5:
            raise ValueError("head.anchor_sizes and head.anchor_strides need 5 entries (P3..P7)")
        if self.channels % self.num_groups:
            raise ValueError(f"head.channels={self.channels} is not divisible by head.num_groups={self.num_groups}")
        if self.offset_mode not in ("compat", "resize"):
            raise ValueError(f"head.offset_mode must be 'compat' or 'resize', got {self.offset_mode!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroundingHeadConfig:
        """Inverse of ``dataclasses.asdict`` (lists become tuples); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError(f"unknown grounding head config keys: {unknown}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def build_grounding_head(backbone: FusionBackbone, cfg: GroundingHeadConfig) -> GroundingHead:
    """A :class:`GroundingHead` sized for ``backbone``'s last three pyramid maps and text width.

    Raises:
        ValueError: the backbone exposes fewer than three pyramid maps or they are not at strides 8/16/32.
    """
    specs = backbone.feature_specs[-3:]
    if len(specs) != 3 or tuple(s.stride for s in specs) != (8, 16, 32):
        raise ValueError(
            f"the grounding head needs pyramid maps at strides 8/16/32, the backbone gives "
            f"{[(s.name, s.stride) for s in backbone.feature_specs]}: use a fine variant "
            "(model.variant=fine_v2 or fine_v3)"
        )
    return GroundingHead(
        [s.channels for s in specs],
        backbone.text_dim,
        cfg.num_convs,
        channels=cfg.channels,
        num_classes=cfg.num_classes,
        anchor_sizes=cfg.anchor_sizes,
        anchor_strides=cfg.anchor_strides,
        num_groups=cfg.num_groups,
        drop_block_prob=cfg.drop_block_prob,
        drop_block_size=cfg.drop_block_size,
        offset_mode=cast(OffsetMode, cfg.offset_mode),  # checked in GroundingHeadConfig.__post_init__
        grad_checkpointing=cfg.grad_checkpointing,
        topk=cfg.topk,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        reg_loss_weight=cfg.reg_loss_weight,
        unmatched_last_token=cfg.unmatched_last_token,
        reduce_mean=distributed_mean,
    )


def distributed_mean(x: Tensor) -> Tensor:
    """Mean of a scalar over all ranks (identity without an initialised process group).

    The grounding losses normalise by the number of positives averaged over ranks (docs/reference/training.md §3.7).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            y = x.detach().clone()
            torch.distributed.all_reduce(y)
            return y / world
    return x


class GroundingModel(FiberPreTrainedModel):
    """Fine FIBER: fusion backbone (fine variant) + grounding head (docs/reference/training.md §3.1).

    ``forward(batch)`` takes a :class:`fiber_data.GroundingBatch` and returns the training loss
    (token focal + GIoU + centerness); :meth:`predict` runs the shared detection/grounding inference (§4.7).

    Args:
        backbone: any fusion backbone whose last three ``feature_specs`` are at strides 8/16/32.
        head: the grounding head (see :func:`build_grounding_head`).
        max_empty_fraction: batches with more box-less images than this fraction are skipped (§3.7).
        head_config: the configuration ``head`` was built from (needed by :meth:`save_pretrained`).
    """

    def __init__(
        self,
        backbone: FusionBackbone,
        head: GroundingHead,
        max_empty_fraction: float = 0.1,
        head_config: GroundingHeadConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.max_empty_fraction = max_empty_fraction
        self.head_config = head_config

    model_type = "grounding"
    config_class = GroundingHeadConfig

    def get_config(self) -> GroundingHeadConfig:
        """The head's config.

        Raises:
            ValueError: the model was built without ``head_config``.
        """
        if self.head_config is None:
            raise ValueError("GroundingModel was built without head_config; build it with GroundingModel.from_config")
        return self.head_config

    @classmethod
    def head_config_from_dict(cls, data: Mapping[str, Any]) -> GroundingHeadConfig:
        """The head config from its ``config.json`` entry."""
        return GroundingHeadConfig.from_dict(data)

    @classmethod
    def from_config(cls, backbone: FusionBackbone, config: GroundingHeadConfig) -> GroundingModel:
        """A fresh model: ``backbone`` + a head built by :func:`build_grounding_head`."""
        return cls(backbone, build_grounding_head(backbone, config), config.max_empty_fraction, config)

    def features(self, pixel_values: Tensor, text: TextInputs) -> tuple[list[Tensor], Tensor, Tensor]:
        """Fused forward.

        Args:
            pixel_values: ``[B, 3, H, W]`` with ``H``, ``W`` multiples of 32.
            text: ``[B, L]`` token ids and mask.

        Returns:
            ``(pyramid, text_hidden [B, L, C_txt], text_mask [B, L])`` where ``pyramid`` holds the three maps
            at strides 8, 16, 32.
        """
        out = self.backbone(pixel_values, text, fuse=True)
        if out.text is None:  # pragma: no cover - a fused forward with text always returns text features
            raise RuntimeError("the backbone returned no text features")
        return list(out.image.pyramid)[-3:], out.text.hidden, out.text.mask

    def forward(self, batch: Any) -> StepOutput:
        """Training loss of a :class:`fiber_data.GroundingBatch` (boxes in the padded input's pixels).

        A batch that the reference would skip (every image, or more than ``max_empty_fraction`` of them,
        without boxes) returns a zero loss that still touches every trainable parameter (so that DDP sees
        all gradients) and logs ``grounding/skipped = 1``.
        """
        targets = GroundingTargets(
            boxes=[t.boxes for t in batch.targets], positive_maps=[t.positive_map for t in batch.targets]
        )
        if should_skip_batch(targets, self.max_empty_fraction):
            zero = sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), batch.pixel_values.new_zeros(()))
            return StepOutput(loss=zero, logs={"grounding/skipped": zero.new_ones(())})
        pyramid, hidden, mask = self.features(batch.pixel_values, TextInputs(batch.input_ids, batch.attention_mask))
        out = self.head(pyramid, hidden, mask, targets)
        assert out.loss is not None
        logs = dict(out.logs)
        logs["grounding/skipped"] = out.loss.new_zeros(())
        return StepOutput(loss=out.loss, logs=logs)

    @torch.no_grad()
    def predict(
        self,
        pixel_values: Tensor,
        text: TextInputs,
        positive_maps: Tensor,
        image_sizes: Tensor,
        original_sizes: Tensor | None = None,
        config: PostprocessConfig | None = None,
    ) -> list[GroundingDetections]:
        """Detections per image for the phrases/classes of ``positive_maps`` (docs/reference/training.md §4.7).

        Args:
            pixel_values: ``[B, 3, Hp, Wp]`` padded batch.
            text: ``[B, L]`` prompt tokens.
            positive_maps: ``[B, K, L]`` binary token map of each phrase/class (zero rows are padding).
            image_sizes: ``[B, 2]`` ``(h, w)`` of each resized image before padding.
            original_sizes: ``[B, 2]`` ``(h, w)`` to rescale boxes to (``None``: input pixels).
            config: post-processing thresholds.

        Returns:
            One :class:`fiber_heads.grounding.GroundingDetections` per image; labels index ``K``.
        """
        pyramid, hidden, mask = self.features(pixel_values, text)
        return self.head.predict(pyramid, hidden, mask, positive_maps, image_sizes, original_sizes, config)
