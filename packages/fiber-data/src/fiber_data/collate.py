"""Collation of samples that carry one text each: :class:`TextBatchCollator` (drop skipped samples, tokenise the
texts to exactly ``max_length``), and image-text pairs into :class:`~fiber_data.types.ImageTextBatch`
(docs/reference/training.md §1.1 and §1.3).

:class:`ImageTextCollator` stacks the images, tokenises the captions padded to exactly ``max_length`` (40 in the
coarse stage) and, when MLM is on, builds the masked copy of the text and its labels with
:func:`~fiber_data.text.masking.mask_tokens`. The VQAv2 and NLVR2 collators (:mod:`fiber_data.sources.vqa`,
:mod:`fiber_data.sources.nlvr2`) are text-batch collators too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

from fiber_data.robust import split_for_collate
from fiber_data.text.masking import mask_tokens
from fiber_data.types import EmptyBatch, ImageTextBatch, ImageTextSample, SkippedSample, Tokenizer

__all__ = ["ImageTextCollator", "TextBatchCollator"]

S = TypeVar("S")
B = TypeVar("B")


class TextBatchCollator(Generic[S, B]):
    """Base of the ``collate_fn`` of samples with one text each (subclasses say which text and build the batch).

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer`.
        max_length: text length ``L`` (padded and truncated to exactly this).
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def text_of(self, sample: S) -> str:
        """The text of ``sample`` to tokenise."""
        raise NotImplementedError

    def build(self, samples: list[S], input_ids: Tensor, attention_mask: Tensor, skipped: tuple[str, ...]) -> B:
        """The batch of the kept ``samples``, with their texts' ``input_ids [B, L]`` (long) and
        ``attention_mask [B, L]`` (bool)."""
        raise NotImplementedError

    def __call__(self, samples: Sequence[S | SkippedSample | None]) -> B | EmptyBatch:
        """Collate ``B`` samples; skipped / ``None`` samples are dropped and listed in ``batch.skipped``, and an
        :class:`~fiber_data.types.EmptyBatch` comes back when all were skipped."""
        kept, skipped = split_for_collate(samples)
        if not kept:
            return EmptyBatch(skipped)
        enc = self.tokenizer([self.text_of(s) for s in kept], max_length=self.max_length, padding="max_length")
        return self.build(kept, enc.input_ids.long(), enc.attention_mask.bool(), skipped)


class ImageTextCollator(TextBatchCollator[ImageTextSample, ImageTextBatch]):
    """``collate_fn`` for :class:`~fiber_data.types.ImageTextSample` lists.

    Args:
        tokenizer: any :class:`~fiber_data.types.Tokenizer`.
        max_length: text length ``L`` (padded and truncated to exactly this; 40 in the coarse stage).
        mlm_probability: MLM selection probability; ``0`` or ``mlm=False`` gives ``mlm_* = None``.
        generator: RNG for the masks. With DataLoader workers every worker gets a copy of the same generator
            state, so leave it ``None`` there (torch seeds each worker's global RNG differently).
        mlm: build MLM inputs and labels.

    Tokens never masked: ``<s>``, ``</s>``, ``<pad>`` and any id in ``tokenizer.special_ids`` when the
    tokenizer has that attribute.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int = 40,
        mlm_probability: float = 0.15,
        generator: torch.Generator | None = None,
        *,
        mlm: bool = True,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        super().__init__(tokenizer, max_length)
        self.mlm_probability = float(mlm_probability)
        self.generator = generator
        self.mlm = bool(mlm) and self.mlm_probability > 0
        specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        specials |= set(getattr(tokenizer, "special_ids", ()))
        self.special_ids: frozenset[int] = frozenset(int(s) for s in specials)

    def text_of(self, sample: ImageTextSample) -> str:
        return sample.caption

    def build(
        self, samples: list[ImageTextSample], input_ids: Tensor, attention_mask: Tensor, skipped: tuple[str, ...]
    ) -> ImageTextBatch:
        """:class:`~fiber_data.types.ImageTextBatch` with ``pixel_values [B, 3, H, W]`` (float),
        ``input_ids``/``mlm_input_ids``/``mlm_labels`` ``[B, L]`` (long), ``attention_mask [B, L]`` (bool),
        ``index [B]`` (long), and the image ids and captions as tuples."""
        shapes = {tuple(s.image.shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must share a shape, got {sorted(shapes)}")
        pixel_values = torch.stack([s.image for s in samples]).float()
        mlm_input_ids = mlm_labels = None
        if self.mlm:
            mlm_input_ids, mlm_labels = mask_tokens(
                input_ids,
                attention_mask,
                mask_token_id=self.tokenizer.mask_token_id,
                vocab_size=self.tokenizer.vocab_size,
                special_ids=self.special_ids,
                probability=self.mlm_probability,
                generator=self.generator,
            )
        return ImageTextBatch(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            mlm_input_ids=mlm_input_ids,
            mlm_labels=mlm_labels,
            index=torch.tensor([s.index for s in samples], dtype=torch.long),
            image_ids=tuple(s.image_id for s in samples),
            captions=tuple(s.caption for s in samples),
            skipped=skipped,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={self.tokenizer!r}, max_length={self.max_length}, "
            f"mlm_probability={self.mlm_probability if self.mlm else 0.0})"
        )
