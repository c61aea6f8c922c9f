"""The small public interface of ``fiber-backbones``: inputs, outputs and the backbone Protocol.

Everything that crosses a package boundary is a frozen dataclass of tensors. Consumers (heads, detectors,
trainers) type against these attributes structurally, so any backbone that returns objects with the same
attributes can feed them.

Shape legend: ``B`` batch, ``L`` padded text length, ``N`` image tokens of the last stage, ``C_img`` /
``C_txt`` channel widths, ``H``/``W`` pixel sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

AttentionBackend = Literal["auto", "xformers", "sdpa", "eager"]
"""Name of an attention implementation (see :mod:`fiber_backbones.attention`)."""


@dataclass(frozen=True)
class TextInputs:
    """Tokenised text, right-padded.

    Attributes:
        input_ids: ``LongTensor [B, L]`` token ids; padding positions hold the tokenizer's pad id.
        attention_mask: ``BoolTensor [B, L]``; ``True`` marks a real token, ``False`` padding.
        position_ids: optional ``LongTensor [B, L]``; when ``None`` the text encoder derives RoBERTa-style
            positions (``cumsum(mask) + pad_id`` for real tokens, ``pad_id`` for padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(self.input_ids.shape)}")
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} != input_ids shape "
                f"{tuple(self.input_ids.shape)}"
            )
        if self.attention_mask.dtype != torch.bool:
            object.__setattr__(self, "attention_mask", self.attention_mask.bool())

    def lengths(self) -> Tensor:
        """Number of real tokens per sample, ``LongTensor [B]``."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> TextInputs:
        """Copy to ``device``."""
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return TextInputs(self.input_ids.to(device), self.attention_mask.to(device), pos)

    def index_select(self, index: Tensor) -> TextInputs:
        """Rows ``index`` (``LongTensor [K]``) of the batch, as a new ``TextInputs`` with ``K`` rows."""
        pos = None if self.position_ids is None else self.position_ids[index]
        return TextInputs(self.input_ids[index], self.attention_mask[index], pos)


@dataclass(frozen=True)
class FeatureSpec:
    """One map of the multi-scale pyramid (detectron2 ``ShapeSpec`` + timm ``feature_info``).

    Attributes:
        name: key of the map, e.g. ``"stage2"``.
        channels: channel count of the map.
        stride: input pixels per map cell.
    """

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class ImageOutput:
    """Image-side output of the backbone.

    Attributes:
        tokens: ``[B, N, C_img]`` tokens of the last stage (row-major over ``grid``).
        grid: ``(h, w)`` of the last stage's token grid, ``h * w == N``.
        pyramid: NCHW maps, one per entry of the backbone's ``feature_specs`` (same order); each is
            ``[B, C_s, H / stride_s, W / stride_s]`` (rounded up for inputs not divisible by the stride).
    """

    tokens: Tensor
    grid: tuple[int, int]
    pyramid: tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class TextOutput:
    """Text-side output of the backbone.

    Attributes:
        hidden: ``[B, L, C_txt]`` hidden states of the last text layer.
        mask: ``BoolTensor [B, L]``, ``True`` for real tokens.
    """

    hidden: Tensor
    mask: Tensor


@dataclass(frozen=True)
class FusionOutput:
    """Output of a (possibly fused) forward.

    Attributes:
        image: image-side output.
        text: text-side output, ``None`` when the backbone was called without text.
        fused: whether the cross-attention branches ran.
    """

    image: ImageOutput
    text: TextOutput | None
    fused: bool


@dataclass(frozen=True)
class ImagePrefix:
    """Image-tower state before the first fused block (:meth:`PrefixBackbone.image_prefix`).

    Attributes:
        tokens: ``[B, h*w, C]`` tokens entering block ``next_block``.
        hw: ``(h, w)`` of the current grid.
        pyramid: NCHW maps of the stages already finished (those in ``swin.out_indices``).
        next_block: ``(stage, block)`` where the forward continues.
    """

    tokens: Tensor
    hw: tuple[int, int]
    pyramid: tuple[Tensor, ...]
    next_block: tuple[int, int]

    def index_select(self, index: Tensor) -> ImagePrefix:
        """Rows ``index`` (``LongTensor [K]``) of the batch."""
        return ImagePrefix(self.tokens[index], self.hw, tuple(p[index] for p in self.pyramid), self.next_block)


@dataclass(frozen=True)
class TextPrefix:
    """Text-tower state before the first fused layer (:meth:`PrefixBackbone.text_prefix`).

    Attributes:
        hidden: ``[B, L, C]`` hidden states entering layer ``next_layer``.
        mask: ``BoolTensor [B, L]``.
        next_layer: index of the next text layer to run.
    """

    hidden: Tensor
    mask: Tensor
    next_layer: int

    def index_select(self, index: Tensor) -> TextPrefix:
        """Rows ``index`` (``LongTensor [K]``) of the batch."""
        return TextPrefix(self.hidden[index], self.mask[index], self.next_layer)


@runtime_checkable
class FusionBackbone(Protocol):
    """What a fusion backbone offers to heads, trainers and detector adapters.

    ``forward(pixel_values, text, fuse=True)`` runs both towers with the gated cross-attention of the
    fusion schedule; ``encode_image`` / ``encode_text`` never fuse (dual-encoder path, used by ITC and
    retrieval pre-ranking). With ``text=None`` or ``fuse=False`` the output equals the uni-modal towers.
    """

    feature_specs: tuple[FeatureSpec, ...]
    size_divisibility: int
    image_dim: int
    text_dim: int
    fusion_schedule: tuple[tuple[tuple[int, int], int], ...]

    def encode_image(self, pixel_values: Tensor) -> ImageOutput: ...

    def encode_text(self, text: TextInputs) -> TextOutput: ...

    def forward(self, pixel_values: Tensor, text: TextInputs | None = None, *, fuse: bool = True) -> FusionOutput: ...

    def __call__(self, pixel_values: Tensor, text: TextInputs | None = None, *, fuse: bool = True) -> FusionOutput: ...

    def set_grad_checkpointing(self, enabled: bool = True) -> None: ...

    def fusion_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def no_weight_decay(self) -> set[str]: ...


@runtime_checkable
class PrefixBackbone(FusionBackbone, Protocol):
    """Optional capability of a :class:`FusionBackbone`: run the uni-modal prefixes (the layers below the first
    fused one) once and finish several forwards from them.

    Coarse training (``model.share_prefix=true``) uses it when the backbone has it (``isinstance(backbone,
    PrefixBackbone)``) and otherwise runs every pass from the inputs. A backbone offering it must satisfy
    ``forward(px, text, fuse=f) == forward_from_prefixes(image_prefix(px), text_prefix(text), fuse=f)`` and
    ``encode_text(text) == encode_text_from_prefix(text_prefix(text))``.
    """

    def image_prefix(self, pixel_values: Tensor) -> ImagePrefix:
        """Image-tower state before the first fused block, from ``pixel_values [B, 3, H, W]``."""
        ...

    def text_prefix(self, text: TextInputs) -> TextPrefix:
        """Text-tower state before the first fused layer."""
        ...

    def forward_from_prefixes(
        self, image: ImagePrefix, text: TextPrefix | None = None, *, fuse: bool = True, path_norms: bool | None = None
    ) -> FusionOutput:
        """Finish a forward from the prefixes (``B`` rows each); ``path_norms=None``: the backbone's default."""
        ...

    def encode_text_from_prefix(self, prefix: TextPrefix) -> TextOutput:
        """Finish the uni-modal text tower (no fusion) from :meth:`text_prefix`."""
        ...
