"""detectron2 shim for the fusion backbone (extra ``fiber-backbones[detectron2]``; detectron2 itself is not on
PyPI: install it from source first, ``pip install 'git+https://github.com/facebookresearch/detectron2.git'``).

Implements docs/reference/design.md §11.3 for detectron2:
:class:`FiberD2Backbone` subclasses ``detectron2.modeling.Backbone`` around a
:class:`~fiber_backbones.adapters.vision_only.FiberVisionBackbone`, and importing this module registers two
builders in ``BACKBONE_REGISTRY``:

- ``build_fiber_backbone``: the stage maps ``stage1..3`` (strides 8/16/32, channels 256/512/1024 for FIBER-B);
- ``build_fiber_fpn_backbone``: those maps + detectron2's ``FPN`` with ``LastLevelP6P7`` on P5 (levels
  ``p3..p7``, the FPN of ``docs/reference/training.md`` §3.2).

Config (call :func:`add_fiber_config` before merging a YAML)::

    from detectron2.config import get_cfg
    from fiber_backbones.adapters.detectron2 import add_fiber_config

    cfg = get_cfg(); add_fiber_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_fiber_fpn_backbone"
    cfg.MODEL.FIBER.NAME, cfg.MODEL.FIBER.VARIANT = "fiber-base", "fine_v2"
    cfg.MODEL.FIBER.WEIGHTS = "weights/fiber-base-fine"  # directory from fiber_backbones.save_pretrained
    # RetinaNet / FCOS-style heads then read cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

``add_fiber_config`` also sets ImageNet RGB normalisation (``PIXEL_MEAN``/``PIXEL_STD`` in 0-255 units,
``INPUT.FORMAT = "RGB"``); batch padding follows the backbone's ``size_divisibility`` (32). Text is bound on the bottom-up
backbone: ``with find_vision_backbone(model).bind_text(prompt): model(batched_inputs)``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from fiber_backbones.adapters.text_binding import DelegatedTextBinding
from fiber_backbones.adapters.vision_only import FiberVisionBackbone

try:
    # detectron2 is an optional extra, not installed in the pinned dev venv (constraints.txt)
    from detectron2.config import CfgNode  # pyright: ignore[reportMissingImports]
    from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec  # pyright: ignore[reportMissingImports]
    from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7  # pyright: ignore[reportMissingImports]
except ImportError as err:
    raise ImportError(
        "fiber_backbones.adapters.detectron2 needs detectron2, which is not installed; install it from source "
        "(`pip install 'git+https://github.com/facebookresearch/detectron2.git'`), see "
        "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
    ) from err

__all__ = ["FiberD2Backbone", "add_fiber_config", "build_fiber_backbone", "build_fiber_fpn_backbone"]

IMAGENET_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD = [58.395, 57.12, 57.375]


class FiberD2Backbone(DelegatedTextBinding, Backbone):
    """detectron2 ``Backbone`` over a :class:`FiberVisionBackbone`.

    Args:
        view: the vision view (its ``feature_specs`` names become detectron2's ``_out_features``).

    Attributes:
        view: the wrapped view (state-dict prefix ``view.``); ``text``, ``bind_text`` and ``last_output`` are
            its own (:class:`~fiber_backbones.adapters.text_binding.DelegatedTextBinding`).
    """

    def __init__(self, view: FiberVisionBackbone) -> None:
        super().__init__()
        self.view = view
        self._out_features = list(view.out_feature_names)
        self._out_feature_channels = {s.name: s.channels for s in view.feature_specs}
        self._out_feature_strides = {s.name: s.stride for s in view.feature_specs}

    @property
    def size_divisibility(self) -> int:
        """Input padding multiple (detectron2 pads the batch to it)."""
        return self.view.size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        """``{"size_divisibility": s, "square_size": 0}``."""
        return self.view.padding_constraints

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of every output."""
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [B, 3, H, W]`` → ``{name: [B, C, H / stride, W / stride]}``."""
        return dict(self.view(x))


def add_fiber_config(cfg: CfgNode) -> None:
    """Add ``cfg.MODEL.FIBER`` and set ImageNet RGB normalisation.

    Keys: ``NAME`` (registry key, ``"fiber-base"``), ``VARIANT`` (``"fine_v2"``), ``WEIGHTS`` (directory saved by
    :func:`fiber_backbones.save_pretrained`, ``""`` for random init), ``OUT_FEATURES``
    (``["stage1", "stage2", "stage3"]``), ``FUSE`` (``True``), ``OVERRIDES`` (list of ``"dotted.key=value"``
    strings parsed with ``ast.literal_eval``, e.g. ``["text.vocab_size=1000"]``).
    """
    cfg.MODEL.FIBER = CfgNode()
    cfg.MODEL.FIBER.NAME = "fiber-base"
    cfg.MODEL.FIBER.VARIANT = "fine_v2"
    cfg.MODEL.FIBER.WEIGHTS = ""
    cfg.MODEL.FIBER.OUT_FEATURES = ["stage1", "stage2", "stage3"]
    cfg.MODEL.FIBER.FUSE = True
    cfg.MODEL.FIBER.OVERRIDES = []
    cfg.MODEL.PIXEL_MEAN = list(IMAGENET_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(IMAGENET_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"cfg.MODEL.FIBER.OVERRIDES entry {item!r} is not 'dotted.key=value'")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _build_view(cfg: CfgNode) -> FiberVisionBackbone:
    from fiber_backbones.registry import create_backbone

    fc = cfg.MODEL.FIBER
    backbone = create_backbone(
        fc.NAME, pretrained=fc.WEIGHTS or None, variant=fc.VARIANT, **_parse_overrides(list(fc.OVERRIDES))
    )
    return FiberVisionBackbone(backbone, out_features=list(fc.OUT_FEATURES), fuse=bool(fc.FUSE))


@BACKBONE_REGISTRY.register()
def build_fiber_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FiberD2Backbone:
    """detectron2 builder: the fusion backbone's stage maps (``cfg.MODEL.FIBER``)."""
    del input_shape  # 3-channel RGB input is fixed by the backbone config
    return FiberD2Backbone(_build_view(cfg))


@BACKBONE_REGISTRY.register()
def build_fiber_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """detectron2 builder: stage maps + FPN (``cfg.MODEL.FPN.OUT_CHANNELS``, P6/P7 from P5), outputs ``p3..p7``."""
    bottom_up = build_fiber_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = LastLevelP6P7(out_channels, out_channels)
    # detectron2's FPN names its outputs p{log2(stride)}; P6/P7 read the top FPN output (P5 for FIBER), not C5.
    # Set as an attribute: older detectron2 releases have no `in_feature` constructor argument.
    top_block.in_feature = f"p{int(math.log2(bottom_up.view.feature_specs[-1].stride))}"
    return FPN(
        bottom_up=bottom_up,
        in_features=list(bottom_up._out_features),
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
