"""mmdetection shim for the fusion backbone (extra ``fiber-backbones[mmdet]``: mmdet >= 3 with mmengine; mmcv is
installed the mmdetection way, ``mim install mmcv``).

Implements docs/reference/design.md §11.3 for mmdetection 3.x: importing
this module registers :class:`FiberFusionBackbone` into ``mmdet.registry.MODELS``. It returns the stage maps as a
tuple (mmdet's backbone convention) for an mmdet ``FPN`` neck. Example config::

    custom_imports = dict(imports=["fiber_backbones.adapters.mmdet"], allow_failed_imports=False)
    model = dict(
        type="FCOS",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type="FiberFusionBackbone", name="fiber-base", variant="fine_v2",
                      pretrained="weights/fiber-base-fine", out_indices=(1, 2, 3)),
        neck=dict(type="FPN", in_channels=[256, 512, 1024], out_channels=256, start_level=0,
                  add_extra_convs="on_output", num_outs=5, relu_before_extra_convs=True),
        ...)

Text is bound on the backbone: ``with detector.backbone.bind_text(prompt): detector(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from fiber_backbones.adapters.text_binding import DelegatedTextBinding
from fiber_backbones.adapters.vision_only import FiberVisionBackbone

try:
    # mmdet/mmengine are optional extras, not installed in the pinned dev venv (constraints.txt)
    from mmdet.registry import MODELS  # pyright: ignore[reportMissingImports]
    from mmengine.model import BaseModule  # pyright: ignore[reportMissingImports]
except ImportError as err:
    raise ImportError(
        "fiber_backbones.adapters.mmdet needs mmdetection >= 3 and mmengine, which are not installed; install "
        "them with `pip install 'fiber-backbones[mmdet]'` (and mmcv with `mim install mmcv`)"
    ) from err

__all__ = ["FiberFusionBackbone"]


@MODELS.register_module(force=True)
class FiberFusionBackbone(DelegatedTextBinding, BaseModule):
    """mmdet backbone: ``x [B, 3, H, W] -> (map_s [B, C_s, H/s, W/s] for s in out_indices)``.

    Args:
        name: fiber-backbones registry key (``"fiber-base"``, ``"fiber-swin-t"``, ``"fiber-tiny"``...).
        variant: compatibility preset; detection needs a fine one (``"fine_v2"``, ``"fine_v3"``, ``"default"``).
        pretrained: directory saved by :func:`fiber_backbones.save_pretrained`, or ``None`` (random init).
        out_indices: Swin stages whose maps are returned (``swin.out_indices`` of the backbone config).
        fuse: run the cross-attention when text is bound.
        overrides: extra config overrides, dotted keys (``{"text.vocab_size": 1000}``).
        init_cfg: mmengine init config (leave ``None``: weights come from ``pretrained``).

    Attributes:
        view: the :class:`FiberVisionBackbone` (state-dict prefix ``view.backbone.``); ``text``, ``bind_text`` and
            ``last_output`` are its own (:class:`~fiber_backbones.adapters.text_binding.DelegatedTextBinding`).
        out_indices: the returned stages.
        size_divisibility: input padding multiple (use it as ``pad_size_divisor``).
    """

    def __init__(
        self,
        name: str = "fiber-base",
        variant: str = "fine_v2",
        pretrained: str | os.PathLike[str] | None = None,
        out_indices: Sequence[int] = (1, 2, 3),
        fuse: bool = True,
        overrides: Mapping[str, Any] | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        # what super().__init__ reaches (DelegatedTextBinding has no __init__), spelled out for the type checker
        BaseModule.__init__(self, init_cfg=init_cfg)
        from fiber_backbones.registry import create_backbone

        options = {**dict(overrides or {}), "swin.out_indices": tuple(int(i) for i in out_indices)}
        backbone = create_backbone(name, pretrained=pretrained, variant=variant, **options)
        self.view = FiberVisionBackbone(backbone, fuse=fuse)
        self.out_indices: tuple[int, ...] = self.view.out_indices
        self.size_divisibility: int = self.view.size_divisibility

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Stage maps of ``x [B, 3, H, W]`` in ``out_indices`` order."""
        return self.view.forward_tuple(x)
