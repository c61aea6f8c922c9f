"""The small public interface of ``fiber-eval``: the Evaluator Protocol and prediction types.

``fiber-eval`` needs no torch: predictions are numpy arrays or plain Python values. Distributed evaluation
works through an injected ``gather`` callable that all-gathers picklable objects (Fabric's
``all_gather_object``-style), so evaluators never touch ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

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


@dataclass(frozen=True)
class RankingScores:
    """Similarity scores between a set of images and a set of texts.

    Attributes:
        scores: ``float [N_img, N_txt]``, higher means a better match.
        text_to_image: ``int [N_txt]``, index of the ground-truth image of each text.
        image_ids: optional identifiers of the images, length ``N_img``.
    """

    scores: np.ndarray
    text_to_image: np.ndarray
    image_ids: Sequence[Any] | None = None

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


Metrics = Mapping[str, float]
