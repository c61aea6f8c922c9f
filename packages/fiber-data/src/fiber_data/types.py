"""The small public interface of ``fiber-data``: the tokenizer Protocol, samples and batches.

``fiber-data`` depends on no sibling package. Batches carry plain tensors (``input_ids``,
``attention_mask``); the trainer wraps them into the backbone's input type.

Shape legend: ``B`` batch, ``L`` padded text length, ``H``/``W`` image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Encoding:
    """A tokenised batch of strings.

    Attributes:
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]``, ``True`` for real tokens (specials included).
        offsets: per sample, per token, the ``(start, end)`` character span in the source string;
            ``(0, 0)`` for special and padding tokens.
    """

    input_ids: Tensor
    attention_mask: Tensor
    offsets: list[list[tuple[int, int]]]

    def char_to_token(self, batch_index: int, char_index: int) -> int | None:
        """Index of the token covering character ``char_index`` of sample ``batch_index``, or ``None``
        (white space between words, truncated text)."""
        for t, (s, e) in enumerate(self.offsets[batch_index]):
            if s <= char_index < e:
                return t
        return None


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (the offline BPE and the RoBERTa adapter both fit).

    Attributes:
        vocab_size: number of ids.
        pad_token_id / bos_token_id / eos_token_id / mask_token_id: special ids (RoBERTa: 1 / 0 / 2 / 50264).
    """

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        padding: Literal["max_length", "longest"] = "max_length",
    ) -> Encoding:
        """Tokenise ``texts`` as ``<s> text </s>``, truncated to ``max_length`` and padded."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Inverse of tokenisation (up to white-space normalisation)."""
        ...


class _BatchMixin:
    """``to(device)`` and ``pin_memory()`` for frozen dataclasses of tensors."""

    def to(self, device: torch.device | str, non_blocking: bool = False):  # type: ignore[no-untyped-def]
        changes = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **changes)  # type: ignore[type-var]

    def pin_memory(self):  # type: ignore[no-untyped-def]
        changes = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.pin_memory()
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ImageTextSample:
    """One (image, caption) pair.

    Attributes:
        image_id: identifier of the image in its source (COCO id, file name, ...).
        image: ``FloatTensor [3, H, W]``, normalised.
        caption: the caption text.
        index: position of the pair in its dataset (used to fetch queued hard negatives again).
    """

    image_id: int | str
    image: Tensor
    caption: str
    index: int


@dataclass(frozen=True)
class ImageTextBatch(_BatchMixin):
    """A collated batch of image-text pairs.

    Attributes:
        pixel_values: ``FloatTensor [B, 3, H, W]``.
        input_ids: ``LongTensor [B, L]`` clean text.
        attention_mask: ``BoolTensor [B, L]``.
        mlm_input_ids: ``LongTensor [B, L]`` masked text for MLM, or ``None``.
        mlm_labels: ``LongTensor [B, L]`` original ids at masked positions, ``-100`` elsewhere, or ``None``.
        index: ``LongTensor [B]`` dataset positions of the pairs.
        image_ids: source identifiers, one per pair.
        captions: the caption strings, one per pair.
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    mlm_input_ids: Tensor | None
    mlm_labels: Tensor | None
    index: Tensor
    image_ids: tuple[int | str, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])
