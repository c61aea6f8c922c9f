"""The small public interface of ``fiber-data``: the tokenizer Protocol, samples and batches.

``fiber-data`` depends on no sibling package. Batches carry plain tensors (``input_ids``,
``attention_mask``); the trainer wraps them into the backbone's input type.

Shape legend: ``B`` batch, ``L`` padded text length, ``H``/``W`` image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import Field, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self, runtime_checkable

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
    """``to(device)`` and ``pin_memory()`` for dataclasses of tensors.

    Batches are deliberately not frozen: Lightning Fabric walks (and rebuilds) the inputs of a wrapped module's
    ``forward`` for precision conversion, which it refuses to do on frozen dataclasses.
    """

    if TYPE_CHECKING:
        # only dataclasses mix this in: declaring the marker makes ``fields``/``replace`` accept ``self``
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Self:
        changes: dict[str, Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, **changes)

    def pin_memory(self) -> Self:
        changes: dict[str, Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.pin_memory()
        return replace(self, **changes)


class _ImageBatchMixin(_BatchMixin):
    """:class:`_BatchMixin` for batches whose first dimension is the images': ``len(batch)`` = ``B`` of
    ``pixel_values``."""

    if TYPE_CHECKING:
        pixel_values: Tensor

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])


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


@dataclass
class ImageTextBatch(_ImageBatchMixin):
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
        skipped: ``"dataset:file:record"`` of every sample dropped from this batch because it raised a
            :class:`~fiber_data.errors.DataError` under :class:`~fiber_data.robust.SkipBadSamples` ``policy="skip"``.
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    mlm_input_ids: Tensor | None
    mlm_labels: Tensor | None
    index: Tensor
    image_ids: tuple[int | str, ...]
    captions: tuple[str, ...]
    skipped: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Fine-grained (grounding / detection) samples and batches: docs/reference/training.md §3.8-§3.9, docs/reference/data-formats.md §9 and §12.


@dataclass(frozen=True)
class GroundingSample:
    """One (image, caption, boxes) grounding example after the image transform.

    Attributes:
        image_id: identifier of the record (MDETR ``images[].id``, or the COCO image id).
        image: ``FloatTensor [3, H, W]`` (transformed, not padded).
        caption: the text fed to the model.
        boxes: ``FloatTensor [N, 4]`` xyxy in the "+1" pixel convention (docs/reference/data-formats.md §12), in the
            coordinates of ``image``.
        labels: ``LongTensor [N]`` category ids (1 = "object" for phrase grounding).
        tokens_positive: per box, the ``(start, end)`` character spans of its phrase(s) in ``caption``.
        orig_size: ``(height, width)`` of the image file.
        index: position in the dataset.
        dataset_name: source name (``flickr``, ``refcoco``, ``mixed``, ``coco``, ``synthetic``, ...).
    """

    image_id: int | str
    image: Tensor
    caption: str
    boxes: Tensor
    labels: Tensor
    tokens_positive: tuple[tuple[tuple[int, int], ...], ...]
    orig_size: tuple[int, int]
    index: int
    dataset_name: str = ""


@dataclass(frozen=True)
class GroundingTarget(_BatchMixin):
    """Targets of one image of a :class:`GroundingBatch`.

    Attributes:
        boxes: ``FloatTensor [N, 4]`` xyxy, "+1" convention, in the unpadded image's pixel coordinates.
        positive_map: ``FloatTensor [N, L]`` binary token map of every box (all zero when its spans were lost).
        labels: ``LongTensor [N]`` category ids.
    """

    boxes: Tensor
    positive_map: Tensor
    labels: Tensor


@dataclass
class GroundingBatch(_ImageBatchMixin):
    """A collated grounding batch.

    Attributes:
        pixel_values: ``FloatTensor [B, 3, Hp, Wp]``, zero-padded bottom/right to a multiple of the size
            divisibility.
        image_sizes: ``LongTensor [B, 2]`` ``(height, width)`` of each unpadded image.
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]``.
        targets: one :class:`GroundingTarget` per image.
        index: ``LongTensor [B]`` dataset positions.
        image_ids: source identifiers.
        captions: caption strings.
        orig_sizes: ``(height, width)`` of the original image files.
        pixel_mask: ``BoolTensor [B, Hp, Wp]``, ``True`` on real pixels and ``False`` on the padding, or ``None``
            when the batch was built without it.
        skipped: ``"dataset:file:record"`` of every sample dropped from this batch because it raised a
            :class:`~fiber_data.errors.DataError` under :class:`~fiber_data.robust.SkipBadSamples` ``policy="skip"``.
    """

    pixel_values: Tensor
    image_sizes: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    targets: tuple[GroundingTarget, ...]
    index: Tensor
    image_ids: tuple[int | str, ...]
    captions: tuple[str, ...]
    orig_sizes: tuple[tuple[int, int], ...]
    pixel_mask: Tensor | None = None
    skipped: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GroundingBatch:
        moved = super().to(device, non_blocking)
        return replace(moved, targets=tuple(t.to(device, non_blocking) for t in self.targets))

    def pin_memory(self) -> GroundingBatch:
        pinned = super().pin_memory()
        return replace(pinned, targets=tuple(t.pin_memory() for t in self.targets))


# ----------------------------------------------------------------------------------------------------------------
# Coarse downstream tasks: VQAv2 (docs/reference/training.md §2.3, docs/reference/data-formats.md §6-§7) and NLVR2 (§2.4, §8).


@dataclass(frozen=True)
class VQASample:
    """One VQAv2 question.

    Attributes:
        question_id: VQAv2 ``question_id``.
        image_id: COCO image id.
        image: ``FloatTensor [3, H, W]``.
        question: question text.
        answer_labels: ``LongTensor [K]`` vocabulary rows of the in-vocabulary answers (empty for test).
        answer_scores: ``FloatTensor [K]`` soft scores 0.3 / 0.6 / 0.9 / 1.0 of those answers.
        index: position in the dataset.
    """

    question_id: int
    image_id: int
    image: Tensor
    question: str
    answer_labels: Tensor
    answer_scores: Tensor
    index: int


@dataclass
class VQABatch(_ImageBatchMixin):
    """A collated VQA batch.

    Attributes:
        pixel_values: ``FloatTensor [B, 3, H, W]``.
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]``.
        targets: ``FloatTensor [B, num_answers]`` soft scores (zeros for unanswered test questions).
        question_ids: ``LongTensor [B]``.
        index: ``LongTensor [B]``.
        questions: the question strings.
        skipped: ``"dataset:file:record"`` of every sample dropped from this batch because it raised a
            :class:`~fiber_data.errors.DataError` under :class:`~fiber_data.robust.SkipBadSamples` ``policy="skip"``.
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    question_ids: Tensor
    index: Tensor
    questions: tuple[str, ...]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class NLVR2Sample:
    """One NLVR2 statement about an image pair.

    Attributes:
        identifier: ``<split>-<set>-<pair>-<sentence>``.
        images: ``(left, right)``, each ``FloatTensor [3, H, W]``.
        sentence: the statement.
        label: ``True`` / ``False``, or ``None`` when unknown.
        index: position in the dataset.
    """

    identifier: str
    images: tuple[Tensor, Tensor]
    sentence: str
    label: bool | None
    index: int


@dataclass
class NLVR2Batch(_ImageBatchMixin):
    """A collated NLVR2 batch.

    Attributes:
        pixel_values: ``FloatTensor [B, 2, 3, H, W]`` (left, right).
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]``.
        labels: ``LongTensor [B]`` (1 = True, 0 = False, -100 = unknown).
        index: ``LongTensor [B]``.
        identifiers: statement identifiers.
        skipped: ``"dataset:file:record"`` of every sample dropped from this batch because it raised a
            :class:`~fiber_data.errors.DataError` under :class:`~fiber_data.robust.SkipBadSamples` ``policy="skip"``.
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    index: Tensor
    identifiers: tuple[str, ...]
    skipped: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Error policy during training: samples that could not be loaded, and batches made only of them.


@dataclass(frozen=True)
class SkippedSample:
    """Stand-in for a sample whose loading raised a :class:`~fiber_data.errors.DataError` (policy ``"skip"``).

    Every collator of this package drops these (and plain ``None`` samples) and lists them in
    ``batch.skipped``.

    Attributes:
        dataset: name of the dataset the sample came from.
        file: the file at fault (image or annotation file), or ``""`` when unknown.
        record: the record inside the annotation file, or ``""`` when unknown.
        message: the error message.
        index: the index asked of the dataset.
    """

    dataset: str
    file: str
    record: str
    message: str
    index: int

    @property
    def description(self) -> str:
        """``"dataset:file:record"``."""
        return f"{self.dataset}:{self.file}:{self.record}"


@dataclass(frozen=True)
class EmptyBatch:
    """What a collator returns when every sample of a batch was skipped.

    ``len(batch) == 0``; the trainer counts ``batch.skipped`` and moves on to the next batch.

    Attributes:
        skipped: ``"dataset:file:record"`` of every dropped sample.
    """

    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EmptyBatch:
        return self

    def pin_memory(self) -> EmptyBatch:
        return self
