"""Vision-only view of a fusion backbone, for detectors whose ``extract_feat(images)`` takes no text.

Implements docs/reference/design.md §11.1, §11.2 and §11.4 on top of the
backbone contract of ``docs/reference/architecture.md`` §2.3 and §9 (fine model: stage maps through ``norm1..3``, strides
8/16/32, any input size that is a multiple of 32), §7 (gates at zero or no text = the uni-modal towers) and
``docs/reference/training.md`` §3.1 (those maps feed an FPN).

:class:`FiberVisionBackbone` turns a :class:`~fiber_backbones.types.FusionBackbone` into
``pixel_values [B, 3, H, W] -> OrderedDict[name, Tensor [B, C_s, H / s, W / s]]`` and publishes the feature
contract the common detection frameworks read:

- detectron2: :meth:`~FiberVisionBackbone.output_shape` (``{name: ShapeSpec}``), ``size_divisibility``,
  ``padding_constraints``;
- mmdetection / timm: ``out_indices``, :meth:`~FiberVisionBackbone.forward_tuple`, ``feature_info``,
  :meth:`~FiberVisionBackbone.channels`, :meth:`~FiberVisionBackbone.reduction`.

Text is *bound* rather than passed: ``with view.bind_text(prompt): detector(images)`` (or ``view.text = prompt``)
makes every forward inside the block fuse with ``prompt``. A prompt has one row per image, or a single row that is
broadcast to the whole batch (closed-set detection with one class prompt for the dataset); the row count is
checked against the batch at call time. Without bound text the view is a plain Swin backbone (uni-modal path:
with all gates at zero, or unbound, the maps equal the uni-modal tower's). The last
:class:`~fiber_backbones.types.FusionOutput` is kept in ``last_output`` so that heads needing the text features
(GLIP-style token alignment) can read ``last_output.text``.

Example::

    from fiber_backbones import create_backbone
    from fiber_backbones.adapters import FiberVisionBackbone

    view = FiberVisionBackbone(create_backbone("fiber-base", variant="fine_v2"))
    feats = view(images)                          # unimodal: {"stage1": [B,256,H/8,W/8], ...}
    with view.bind_text(prompt):                  # prompt: TextInputs with 1 or B rows
        feats = view(images)                      # fused maps
        text_hidden = view.last_output.text.hidden  # [B, L, 768]
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fiber_backbones.types import FeatureSpec, FusionBackbone, FusionOutput, TextInputs

__all__ = ["FiberVisionBackbone", "ShapeSpec", "broadcast_text", "find_vision_backbone"]


@dataclass(frozen=True)
class ShapeSpec:
    """Framework-neutral twin of detectron2's ``ShapeSpec`` (same field names and order).

    Attributes:
        channels: channel count of the map.
        height: fixed height, or ``None`` (variable-size input).
        width: fixed width, or ``None``.
        stride: input pixels per map cell.
    """

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None


def broadcast_text(text: TextInputs, batch_size: int) -> TextInputs:
    """Match ``text`` to a batch of ``batch_size`` images.

    Args:
        text: ``input_ids [R, L]`` with ``R == batch_size`` (one prompt per image) or ``R == 1`` (one prompt for
            every image).
        batch_size: number of images ``B``.

    Returns:
        ``text`` itself when ``R == B``, otherwise a view expanded to ``[B, L]`` (no copy).

    Raises:
        ValueError: if ``R`` is neither 1 nor ``B``.
    """
    rows = text.input_ids.shape[0]
    if rows == batch_size:
        return text
    if rows != 1:
        raise ValueError(
            f"bound text has {rows} rows but the batch has {batch_size} images; bind one prompt per image "
            "(same order as the images) or a single prompt for the whole batch"
        )
    pos = None if text.position_ids is None else text.position_ids.expand(batch_size, -1)
    return TextInputs(
        text.input_ids.expand(batch_size, -1), text.attention_mask.expand(batch_size, -1), position_ids=pos
    )


def _stage_index(spec: FeatureSpec, position: int) -> int:
    """Swin stage number of a spec named ``stage{i}``; the list position for other names."""
    match = re.fullmatch(r"stage(\d+)", spec.name)
    return int(match.group(1)) if match else position


class FiberVisionBackbone(nn.Module):
    """``images -> {name: NCHW map}`` view of a fusion backbone, with optional bound text.

    Args:
        backbone: a :class:`~fiber_backbones.types.FusionBackbone` that is an ``nn.Module`` (e.g.
            :class:`~fiber_backbones.FiberBackbone`, fine variant for variable-size detection inputs). It becomes
            the submodule ``backbone`` (state-dict prefix ``backbone.``).
        out_features: names (from ``backbone.feature_specs``) of the maps to return (always returned in pyramid
            order); default all of them.
        feature_names: output key of each entry of ``out_features``, same length and order (e.g.
            ``("0", "1", "2")`` for torchvision, ``("res3", "res4", "res5")`` for detectron2 configs); default
            the backbone's names (``"stage1"``...).
        fuse: when text is bound, run the cross-attention branches (``False`` gives uni-modal maps but still
            computes the text features for ``last_output``).
        keep_last_output: store the last :class:`FusionOutput` in ``last_output`` (it holds the autograd graph
            of that forward until the next one; set ``False`` when no head reads it).

    Attributes:
        feature_specs: :class:`FeatureSpec` of each returned map, under its output key.
        out_indices: Swin stage index of each returned map (mmdetection / timm convention).
        size_divisibility: input height and width should be multiples of this (32 for 4-stage Swin).
        last_output: the :class:`FusionOutput` of the last forward, or ``None``.

    Raises:
        TypeError: if ``backbone`` is not an ``nn.Module`` satisfying the ``FusionBackbone`` protocol.
        ValueError: unknown or duplicate ``out_features``, or ``feature_names`` of the wrong length.
    """

    def __init__(
        self,
        backbone: FusionBackbone,
        *,
        out_features: Sequence[str] | None = None,
        feature_names: Sequence[str] | None = None,
        fuse: bool = True,
        keep_last_output: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module) or not isinstance(backbone, FusionBackbone):
            raise TypeError(
                f"backbone must be an nn.Module satisfying fiber_backbones.FusionBackbone, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        specs = tuple(backbone.feature_specs)
        by_name = {s.name: (i, s) for i, s in enumerate(specs)}
        selected = list(out_features) if out_features is not None else [s.name for s in specs]
        unknown = [n for n in selected if n not in by_name]
        if unknown or not selected or len(set(selected)) != len(selected):
            raise ValueError(
                f"out_features {selected} must be distinct names from the backbone's feature_specs "
                f"{[s.name for s in specs]}"
            )
        names = list(feature_names) if feature_names is not None else list(selected)
        if len(names) != len(selected) or len(set(names)) != len(names):
            raise ValueError(f"feature_names {names} must be {len(selected)} distinct keys for {selected}")
        # Pair each key with its map, then put the pairs in pyramid order whatever order the caller used.
        pairs = sorted(zip(names, selected), key=lambda pair: by_name[pair[1]][0])
        names, selected = [key for key, _ in pairs], [n for _, n in pairs]
        self._positions = tuple(by_name[n][0] for n in selected)
        self.feature_specs: tuple[FeatureSpec, ...] = tuple(
            FeatureSpec(key, by_name[n][1].channels, by_name[n][1].stride) for key, n in zip(names, selected)
        )
        self.out_indices: tuple[int, ...] = tuple(_stage_index(by_name[n][1], by_name[n][0]) for n in selected)
        self.size_divisibility: int = int(backbone.size_divisibility)
        self.fuse = fuse
        self.keep_last_output = keep_last_output
        self.last_output: FusionOutput | None = None
        self._text: TextInputs | None = None
        swin_cfg = getattr(getattr(backbone, "config", None), "swin", None)
        if swin_cfg is not None and getattr(swin_cfg, "window_rule", None) == "coarse":
            warnings.warn(
                f"the backbone uses the coarse window rule and accepts only {swin_cfg.img_size}x{swin_cfg.img_size} "
                "inputs; detectors resize and pad to variable sizes, so build it with variant='fine_v2', "
                "'fine_v3' or 'default'",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ feature contract
    @property
    def out_feature_names(self) -> tuple[str, ...]:
        """Output keys, in pyramid order (detectron2 ``_out_features``)."""
        return tuple(s.name for s in self.feature_specs)

    @property
    def padding_constraints(self) -> dict[str, int]:
        """detectron2's padding contract: ``{"size_divisibility": s, "square_size": 0}``."""
        return {"size_divisibility": self.size_divisibility, "square_size": 0}

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style feature info: ``[{"num_chs": C, "reduction": stride, "module": key, "index": stage}]``."""
        return [
            {"num_chs": s.channels, "reduction": s.stride, "module": s.name, "index": i}
            for s, i in zip(self.feature_specs, self.out_indices)
        ]

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{key: ShapeSpec(channels, stride=stride)}`` per returned map (detectron2 ``Backbone.output_shape``)."""
        return {s.name: ShapeSpec(channels=s.channels, stride=s.stride) for s in self.feature_specs}

    def channels(self) -> list[int]:
        """Channel count of each returned map (timm ``feature_info.channels()``)."""
        return [s.channels for s in self.feature_specs]

    def reduction(self) -> list[int]:
        """Stride of each returned map (timm ``feature_info.reduction()``)."""
        return [s.stride for s in self.feature_specs]

    # ------------------------------------------------------------------ text binding
    @property
    def text(self) -> TextInputs | None:
        """The bound prompt (``None``: uni-modal). Assign a :class:`TextInputs` with 1 or ``B`` rows, or ``None``."""
        return self._text

    @text.setter
    def text(self, value: TextInputs | None) -> None:
        if value is not None and not isinstance(value, TextInputs):
            raise TypeError(f"bound text must be a fiber_backbones.TextInputs or None, got {type(value).__name__}")
        self._text = value

    def clear_text(self) -> None:
        """Unbind the prompt (back to the uni-modal Swin path)."""
        self._text = None

    @contextmanager
    def bind_text(self, text: TextInputs | None) -> Iterator[FiberVisionBackbone]:
        """Bind ``text`` for the forwards inside the ``with`` block; the previous binding is restored on exit.

        Args:
            text: ``input_ids``/``attention_mask [R, L]`` with ``R`` equal to the batch size of the images the
                detector will pass, or ``R == 1`` for one prompt shared by every image; ``None`` binds nothing
                (uni-modal inside the block).

        Yields:
            this view.
        """
        previous = self._text
        self.text = text
        try:
            yield self
        finally:
            self._text = previous

    # ------------------------------------------------------------------ forward
    def forward_fusion(self, pixel_values: Tensor) -> FusionOutput:
        """Run the backbone with the bound text (if any) and return its full output.

        Args:
            pixel_values: ``[B, 3, H, W]`` normalised images (``H``, ``W`` multiples of ``size_divisibility``).

        Returns:
            The backbone's :class:`FusionOutput` (``text`` is ``None`` when nothing is bound).

        Raises:
            ValueError: if the bound text has neither 1 nor ``B`` rows.
        """
        text = self._text
        if text is not None:
            text = broadcast_text(text, pixel_values.shape[0])
            if text.input_ids.device != pixel_values.device:
                text = text.to(pixel_values.device)
        out = self.backbone(pixel_values, text, fuse=self.fuse)
        self.last_output = out if self.keep_last_output else None
        return out

    def forward(self, pixel_values: Tensor) -> OrderedDict[str, Tensor]:
        """Feature maps of ``pixel_values`` (fused when text is bound).

        Args:
            pixel_values: ``[B, 3, H, W]``.

        Returns:
            ``OrderedDict`` ``{key: [B, C_s, ceil(H / s), ceil(W / s)]}`` in pyramid order (see
            ``feature_specs``).
        """
        pyramid = self.forward_fusion(pixel_values).image.pyramid
        return OrderedDict((s.name, pyramid[p]) for s, p in zip(self.feature_specs, self._positions))

    def forward_tuple(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        """The maps of :meth:`forward` as a tuple (mmdetection / timm ``features_only`` convention)."""
        return tuple(self.forward(pixel_values).values())

    def extra_repr(self) -> str:
        specs = ", ".join(f"{s.name}: {s.channels}ch/{s.stride}" for s in self.feature_specs)
        return f"features=[{specs}], size_divisibility={self.size_divisibility}, fuse={self.fuse}"


def find_vision_backbone(model: nn.Module) -> FiberVisionBackbone:
    """The first :class:`FiberVisionBackbone` inside ``model`` (e.g. a whole torchvision / detectron2 / mmdet detector).

    Lets code bind text without knowing where the framework keeps the backbone::

        with find_vision_backbone(detector).bind_text(prompt):
            losses = detector(images, targets)

    Raises:
        LookupError: if ``model`` contains none.
    """
    for module in model.modules():
        if isinstance(module, FiberVisionBackbone):
            return module
    raise LookupError(f"{type(model).__name__} contains no FiberVisionBackbone")
