"""The small public interface of ``fiber-heads``: what heads read and what they return.

Heads never import a backbone package. They declare, as Protocols, the attributes they read; any backbone
whose outputs carry those attributes (``fiber_backbones.FusionOutput`` does) can feed them.

Shape legend: ``B`` batch, ``L`` padded text length, ``N`` image tokens, ``C_img`` / ``C_txt`` widths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

GatherFn = Callable[[Tensor], Tensor]
"""All-gather with gradient: ``[B, ...] -> [world_size * B, ...]`` (rank order). Injected by the trainer so
that heads never touch ``torch.distributed``; the identity on a single process."""


def identity_gather(x: Tensor) -> Tensor:
    """The single-process :data:`GatherFn`."""
    return x


class ImageFeatures(Protocol):
    """Image-side features a head reads.

    Attributes:
        tokens: ``[B, N, C_img]`` last-stage image tokens.
    """

    @property
    def tokens(self) -> Tensor: ...


class TextFeatures(Protocol):
    """Text-side features a head reads.

    Attributes:
        hidden: ``[B, L, C_txt]`` last-layer text hidden states.
        mask: ``BoolTensor [B, L]``, ``True`` for real tokens.
    """

    @property
    def hidden(self) -> Tensor: ...

    @property
    def mask(self) -> Tensor: ...


class FusedFeatures(Protocol):
    """Output of a fused forward, as multimodal heads (ITM, MLM, VQA, NLVR2) read it."""

    @property
    def image(self) -> ImageFeatures: ...

    @property
    def text(self) -> TextFeatures | None: ...


@dataclass(frozen=True)
class HeadOutput:
    """What every head's ``forward`` returns.

    Attributes:
        loss: scalar loss (``None`` when no targets were given).
        logits: named output tensors (e.g. ``{"itm": [B, 2]}``), not detached.
        logs: named detached scalars for logging (e.g. ``{"itc/acc_i2t": tensor(0.5)}``).
    """

    loss: Tensor | None
    logits: Mapping[str, Tensor] = field(default_factory=dict[str, Tensor])
    logs: Mapping[str, Tensor] = field(default_factory=dict[str, Tensor])


@dataclass(frozen=True)
class ProjectedFeatures:
    """Output of :class:`fiber_heads.projections.CrossModalProjection` (docs/reference/architecture.md §8.1).

    Attributes:
        text_feats: ``[B, L, H]`` text tokens after ``cross_modal_text_transform`` (the MLM head reads these).
        image_feats: ``[B, N, H]`` image tokens after ``cross_modal_image_transform``.
        cls: ``[B, 2H]`` ``concat(pooled_text, pooled_image)``, text first (ITM, VQA, NLVR2 read this).
    """

    text_feats: Tensor
    image_feats: Tensor
    cls: Tensor


@dataclass(frozen=True)
class ContrastiveOutput(HeadOutput):
    """What :class:`fiber_heads.itc.ContrastiveHead` returns: a :class:`HeadOutput` plus what hard-negative
    mining needs.

    Attributes:
        targets: ``LongTensor [R]``, the column of the positive for each of the ``R`` logit rows.
        num_valid: number of leading logit columns that hold real features; the remaining columns (only in
            the compatibility mode that reproduces the official noise-initialised queue) must not be sampled.
        column_index: ``LongTensor [K]`` dataset index of every logit column (``-1`` when unknown), or
            ``None`` when ``forward`` was called without ``index``. Columns ``[0, B)`` are the local batch,
            the following ones queue entries (or, in the gathered mode, the other ranks' samples).
    """

    targets: Tensor | None = None
    num_valid: int | None = None
    column_index: Tensor | None = None
