"""The small public interface of ``fiber-eval``: the Evaluator Protocol and prediction types.

``fiber-eval`` needs no torch: predictions are numpy arrays or plain Python values. Distributed evaluation
works through an injected ``gather`` callable that all-gathers picklable objects (Fabric's
``all_gather_object``-style), so evaluators never touch ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

P = TypeVar("P", contravariant=True)

GatherObjects = Callable[[list[Any]], list[Any]]
"""Gathers each rank's list of picklable items into one list (all ranks' items, rank order)."""


@runtime_checkable
class Evaluator(Protocol[P]):
    """Accumulates predictions, then computes metrics.

    ``update`` may be called many times; ``compute`` gathers the accumulated state across processes with the
    injected ``gather`` (``None`` on a single process) and returns flat ``{metric_name: value}``.
    """

    def reset(self) -> None: ...

    def update(self, predictions: Sequence[P]) -> None: ...

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]: ...


T = TypeVar("T")


class AccumulatingEvaluator(Generic[T]):
    """The accumulating half of an :class:`Evaluator` that keeps its predictions in a list: ``reset``, ``update``
    (each prediction first passes :meth:`check`) and ``state``, the picklable list that the subclass's
    ``compute`` gathers across ranks. A subclass sets ``self._items = []`` (or calls :meth:`reset`) in
    ``__init__``."""

    _items: list[T]

    def reset(self) -> None:
        """Forgets the accumulated predictions."""
        self._items = []

    def update(self, predictions: Sequence[T]) -> None:
        """Adds predictions, each checked by :meth:`check`."""
        for i, p in enumerate(predictions):
            self.check(p, i)
            self._items.append(p)

    def check(self, prediction: T, index: int) -> None:
        """Raise for a prediction this evaluator cannot score (``index``: its position in the ``update`` call);
        by default every prediction is accepted."""

    def state(self) -> list[T]:
        """The picklable state that ``compute`` gathers across ranks."""
        return list(self._items)


@dataclass(frozen=True)
class RankingScores:
    """Similarity scores between a set of images and a set of texts.

    Attributes:
        scores: ``float [N_img, N_txt]``, higher means a better match.
        text_to_image: ``int [N_txt]``, index of the ground-truth image of each text.
        image_ids: optional identifiers of the images, length ``N_img``.
        text_ids: optional identifiers of the texts, length ``N_txt``. When given, evaluators drop repeated ids
            (padding added by a distributed sampler) and order texts by id, so the metrics do not depend on how
            the texts were sharded.

    A block holds *all* images of the evaluated set and a subset (shard) of its texts: blocks from several
    ``update`` calls or ranks are concatenated along the text axis.
    """

    scores: np.ndarray
    text_to_image: np.ndarray
    image_ids: Sequence[Any] | None = None
    text_ids: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be [N_img, N_txt], got shape {self.scores.shape}")
        if self.text_to_image.shape != (self.scores.shape[1],):
            raise ValueError(
                f"text_to_image must have one entry per text ({self.scores.shape[1]}), got {self.text_to_image.shape}"
            )
        if self.text_to_image.size and (
            self.text_to_image.min() < 0 or self.text_to_image.max() >= self.scores.shape[0]
        ):
            raise ValueError("text_to_image holds an index outside [0, N_img)")
        if self.image_ids is not None and len(self.image_ids) != self.scores.shape[0]:
            raise ValueError(f"image_ids must have {self.scores.shape[0]} entries, got {len(self.image_ids)}")
        if self.text_ids is not None and len(self.text_ids) != self.scores.shape[1]:
            raise ValueError(f"text_ids must have {self.scores.shape[1]} entries, got {len(self.text_ids)}")


@dataclass(frozen=True)
class VQAAnswer:
    """One predicted VQA answer.

    Attributes:
        question_id: the VQAv2 ``question_id``.
        answer: the answer string as produced by the model (normalised by the evaluator, not by the caller).
    """

    question_id: int
    answer: str


@dataclass(frozen=True)
class NLVR2Prediction:
    """One NLVR2 statement classified by the model.

    Attributes:
        identifier: the statement ``identifier`` (``<split>-<set>-<pair>-<sentence>``).
        prediction: ``True`` when the statement is predicted true of the image pair.
    """

    identifier: str
    prediction: bool


@dataclass(frozen=True)
class Caption:
    """One generated caption (special tokens already removed).

    Attributes:
        image_id: identifier of the image in the ground-truth caption file.
        caption: generated text.
    """

    image_id: Any
    caption: str


@dataclass(frozen=True)
class Detections:
    """Detections of one image, in original-image pixel coordinates.

    Attributes:
        image_id: the image ``id`` of the ground-truth JSON.
        boxes_xyxy: ``float [K, 4]`` boxes ``(x1, y1, x2, y2)``; which convention (continuous or inclusive
            "+1") is a property of the evaluator that receives them.
        scores: ``float [K]`` confidence scores.
        labels: ``int [K]`` category ids (or contiguous labels that the evaluator maps to category ids).
    """

    image_id: int
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PhraseBoxes:
    """Ranked boxes for every evaluated phrase of one Flickr30k Entities sentence.

    Attributes:
        image_id: Flickr30k image id (the file stem, e.g. ``"3385593926"``).
        sentence_index: index of the sentence in ``Sentences/<image_id>.txt`` (0-based line number).
        boxes: one ``float [K_p, 4]`` xyxy array per evaluated phrase, in sentence order, sorted by
            descending score.
    """

    image_id: str
    sentence_index: int
    boxes: Sequence[np.ndarray]


@dataclass(frozen=True)
class RefExpPrediction:
    """All boxes predicted for one referring expression.

    Attributes:
        item_id: the ``images[].id`` of the MDETR-style RefCOCO JSON (one per expression).
        boxes_xyxy: ``float [K, 4]`` boxes in original-image pixels.
        scores: ``float [K]`` scores (the evaluator sorts them itself).
    """

    item_id: int
    boxes_xyxy: np.ndarray
    scores: np.ndarray


Metrics = Mapping[str, float]
