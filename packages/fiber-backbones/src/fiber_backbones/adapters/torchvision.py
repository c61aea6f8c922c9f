"""torchvision detection backbone: fusion backbone + FPN (extra ``fiber-backbones[torchvision]``).

Implements docs/reference/design.md §11 for torchvision, with the FPN of
``docs/reference/training.md`` §3.2: lateral 1x1 and output 3x3 convolutions on the stage-1..3 maps (strides 8, 16, 32),
nearest top-down up-sampling, ``P6 = Conv3x3/2(P5)`` and ``P7 = Conv3x3/2(ReLU(P6))`` on the FPN output P5,
Kaiming-uniform (a=1) init. (The training-only DropBlock of the official FPN is not part of torchvision's FPN.)

:class:`FiberFPNBackbone` satisfies torchvision's detection-backbone contract (an ``out_channels`` attribute and
``forward(images) -> OrderedDict[str, Tensor]``), so ``FCOS``, ``RetinaNet`` and ``FasterRCNN`` from
``torchvision.models.detection`` accept it unchanged; the default ``extra_blocks="p6p7"`` gives the five levels
(strides 8..128) their default anchor generators expect. Body maps are keyed ``"0"``, ``"1"``, ``"2"`` like
torchvision's ResNet-FPN, so Faster R-CNN's default ``MultiScaleRoIAlign(["0", "1", "2", "3"])`` pools them.

Example::

    from torchvision.models.detection import FCOS
    from fiber_backbones.adapters.torchvision import FiberFPNBackbone

    backbone = FiberFPNBackbone.from_name("fiber-base", variant="fine_v2", pretrained="weights/fiber-base-fine")
    detector = FCOS(backbone, num_classes=80)
    with backbone.bind_text(prompt):            # optional: fused features; TextInputs with 1 or B rows
        losses = detector(images, targets)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fiber_backbones.adapters.text_binding import DelegatedTextBinding
from fiber_backbones.adapters.vision_only import FiberVisionBackbone, ShapeSpec
from fiber_backbones.types import FusionBackbone

try:
    from torchvision.ops.feature_pyramid_network import (
        ExtraFPNBlock,
        FeaturePyramidNetwork,
        LastLevelMaxPool,
        LastLevelP6P7,
    )
except ImportError as err:  # pragma: no cover - exercised by tests that hide torchvision
    raise ImportError(
        "fiber_backbones.adapters.torchvision needs torchvision (>= 0.18); install it with "
        "`pip install 'fiber-backbones[torchvision]'`"
    ) from err

__all__ = ["OFFICIAL_FPN_PREFIX", "FiberFPNBackbone"]

OFFICIAL_FPN_PREFIX = "fusion_backbone.backbone.fpn."
"""Prefix of the FPN weights in the official fine-grained checkpoints (``fpn_inner{2,3,4}``, ``fpn_layer{2,3,4}``,
``top_blocks.p6``, ``top_blocks.p7``)."""

ExtraBlocks = Literal["p6p7", "maxpool"]


class FiberFPNBackbone(DelegatedTextBinding, nn.Module):
    """Fusion backbone + torchvision ``FeaturePyramidNetwork``, a drop-in torchvision detection backbone.

    Args:
        backbone: a fusion backbone ``nn.Module`` (fine variant) or an existing :class:`FiberVisionBackbone`
            (then ``out_features``/``fuse`` must be left at their defaults).
        out_channels: channels of every FPN level (256 in FIBER's detector).
        extra_blocks: ``"p6p7"`` (P6/P7 from P5, FCOS/RetinaNet/GLIP, 5 levels), ``"maxpool"`` (a stride-2
            max-pool of the top level, ResNet-FPN style), a torchvision ``ExtraFPNBlock``, or ``None``.
        out_features: backbone map names fed to the FPN (default all, e.g. ``stage1..stage3``).
        fuse: see :class:`FiberVisionBackbone`.

    Attributes:
        body: the :class:`FiberVisionBackbone` (keys ``"0"``, ``"1"``, ...); ``text``, ``bind_text``, ``clear_text`` and
            ``last_output`` are its own (:class:`~fiber_backbones.adapters.text_binding.DelegatedTextBinding`).
        fpn: the torchvision FPN; outputs keep the body keys and add ``"p6"``, ``"p7"`` or ``"pool"``.
        out_channels: ``out_channels`` (read by torchvision's detectors).
    """

    vision_attr = "body"

    def __init__(
        self,
        backbone: FusionBackbone | FiberVisionBackbone,
        *,
        out_channels: int = 256,
        extra_blocks: ExtraBlocks | ExtraFPNBlock | None = "p6p7",
        out_features: Sequence[str] | None = None,
        fuse: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(backbone, FiberVisionBackbone):
            if out_features is not None or not fuse:
                raise ValueError(
                    "pass out_features/fuse to FiberVisionBackbone, not to FiberFPNBackbone, when wrapping a view"
                )
            body = backbone
        else:
            order = [s.name for s in backbone.feature_specs]
            # pyramid order, so that keys "0", "1", ... go from fine to coarse (unknown names are reported below)
            names = sorted(
                order if out_features is None else out_features, key=lambda n: order.index(n) if n in order else -1
            )
            body = FiberVisionBackbone(
                backbone, out_features=names, feature_names=[str(i) for i in range(len(names))], fuse=fuse
            )
        self.body = body
        if isinstance(extra_blocks, str):
            if extra_blocks == "p6p7":
                # in == out channels: torchvision's LastLevelP6P7 then builds P6 from P5 (docs/reference/training.md §3.2).
                extra: ExtraFPNBlock | None = LastLevelP6P7(out_channels, out_channels)
            elif extra_blocks == "maxpool":
                extra = LastLevelMaxPool()
            else:
                raise ValueError(
                    f"extra_blocks must be 'p6p7', 'maxpool', an ExtraFPNBlock or None, got {extra_blocks!r}"
                )
        else:
            extra = extra_blocks
        self.fpn = FeaturePyramidNetwork(body.channels(), out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self._extra_names = {LastLevelP6P7: ("p6", "p7"), LastLevelMaxPool: ("pool",)}.get(type(extra), ())

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        variant: str = "fine_v2",
        pretrained: str | os.PathLike[str] | None = None,
        out_channels: int = 256,
        extra_blocks: ExtraBlocks | ExtraFPNBlock | None = "p6p7",
        fuse: bool = True,
        **overrides: Any,
    ) -> FiberFPNBackbone:
        """Build a registered backbone (see :func:`fiber_backbones.create_backbone`) and wrap it.

        Args:
            name: registry key, e.g. ``"fiber-base"``.
            variant: compatibility preset; detection needs a fine one (``"fine_v2"``, ``"fine_v3"``, ``"default"``).
            pretrained: directory saved by :func:`fiber_backbones.save_pretrained` (backbone weights only; the
                FPN starts from its own initialisation).
            out_channels: FPN width.
            extra_blocks: see the class.
            fuse: see :class:`FiberVisionBackbone`.
            **overrides: config overrides, e.g. ``**{"text.vocab_size": 1000}``.
        """
        from fiber_backbones.registry import create_backbone

        backbone = create_backbone(name, pretrained=pretrained, variant=variant, **overrides)
        return cls(backbone, out_channels=out_channels, extra_blocks=extra_blocks, fuse=fuse)

    # ------------------------------------------------------------------ contract
    @property
    def size_divisibility(self) -> int:
        """Input sizes should be multiples of this (torchvision's transform pads to 32 by default)."""
        return self.body.size_divisibility

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{key: ShapeSpec(out_channels, stride=...)}`` for every FPN output, extra levels included."""
        shapes = {s.name: ShapeSpec(channels=self.out_channels, stride=s.stride) for s in self.body.feature_specs}
        top = self.body.feature_specs[-1].stride
        for i, key in enumerate(self._extra_names, start=1):
            shapes[key] = ShapeSpec(channels=self.out_channels, stride=top * 2**i)
        return shapes

    # ------------------------------------------------------------------ official FPN weights
    def official_fpn_key_map(self) -> dict[str, str]:
        """``{official name (without prefix): name in self.fpn}`` for the official fine checkpoints' FPN.

        The official FPN numbers its levels by Swin stage + 1 (``fpn_inner2`` is the stride-8 lateral on stage 1);
        torchvision's FPN numbers them from 0 in pyramid order.

        Raises:
            ValueError: if the FPN does not use the ``"p6p7"`` extra blocks (the official one does).
        """
        if not isinstance(self.fpn.extra_blocks, LastLevelP6P7):
            raise ValueError("the official FPN has P6/P7 top blocks; build FiberFPNBackbone with extra_blocks='p6p7'")
        mapping: dict[str, str] = {}
        for i, stage in enumerate(self.body.out_indices):
            for param in ("weight", "bias"):
                mapping[f"fpn_inner{stage + 1}.{param}"] = f"inner_blocks.{i}.0.{param}"
                mapping[f"fpn_layer{stage + 1}.{param}"] = f"layer_blocks.{i}.0.{param}"
        for block in ("p6", "p7"):
            for param in ("weight", "bias"):
                mapping[f"top_blocks.{block}.{param}"] = f"extra_blocks.{block}.{param}"
        return mapping

    def load_official_fpn(self, state_dict: Mapping[str, Tensor], prefix: str = OFFICIAL_FPN_PREFIX) -> None:
        """Copy the FPN weights of an official fine-grained FIBER checkpoint into ``self.fpn``.

        With them, the eval-mode FPN output equals the official FPN's (``docs/reference/training.md`` §3.2; the official
        training-only DropBlock has no weights). The backbone weights are loaded separately (``from_name(...,
        pretrained=...)``).

        Args:
            state_dict: the checkpoint's (flat) state dict; other keys are ignored.
            prefix: prefix of the FPN keys in ``state_dict``.

        Raises:
            KeyError: naming the official keys that are missing.
            ValueError: naming a key whose shape does not match this FPN (e.g. another ``out_channels``).
        """
        mapping = self.official_fpn_key_map()
        missing = [prefix + k for k in mapping if prefix + k not in state_dict]
        if missing:
            raise KeyError(f"official FPN weights missing from the state dict: {missing}")
        own = self.fpn.state_dict()
        for src, dst in mapping.items():
            value = state_dict[prefix + src]
            if tuple(value.shape) != tuple(own[dst].shape):
                raise ValueError(
                    f"{prefix + src} has shape {tuple(value.shape)}, but fpn.{dst} expects {tuple(own[dst].shape)}"
                )
        with torch.no_grad():
            for src, dst in mapping.items():
                own[dst].copy_(state_dict[prefix + src])

    def forward(self, pixel_values: Tensor) -> OrderedDict[str, Tensor]:
        """FPN levels of ``pixel_values`` (fused when text is bound).

        Args:
            pixel_values: ``[B, 3, H, W]`` (torchvision passes ``ImageList.tensors``).

        Returns:
            ``OrderedDict`` ``{"0": [B, out_channels, H/8, W/8], "1": ..., "2": ..., "p6": ..., "p7": ...}``
            (strides from :meth:`output_shape`).
        """
        return self.fpn(self.body(pixel_values))
