"""Merging evaluator state across processes through an injected ``gather`` callable.

Evaluators never import ``torch.distributed``: the trainer passes a callable with the semantics of
``all_gather_object`` flattened to one list (see :data:`fiber_eval.types.GatherObjects`). Distributed samplers
may pad the last batch by repeating samples; :func:`merge_unique` drops such repeats by key, so padded
items are never counted twice (docs/reference/evaluation.md §4.2, "must not be padded/duplicated").
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import numpy as np

from fiber_eval.types import GatherObjects

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

__all__ = ["all_gather_concat", "gather_items", "merge_unique", "same_prediction"]


def gather_items(items: list[Any], gather: GatherObjects | None) -> list[Any]:
    """Collects every rank's state items.

    Args:
        items: this rank's picklable state items.
        gather: the injected all-gather (``None`` on a single process).

    Returns:
        The items of all ranks in rank order (this rank's own items when ``gather`` is ``None``).

    Raises:
        TypeError: if ``gather`` returns something that is not a list.
    """
    if gather is None:
        return list(items)
    out = gather(list(items))
    if not isinstance(out, list):
        raise TypeError(f"gather must return a list of all ranks' items, got {type(out).__name__}")
    return out


def same_prediction(a: Any, b: Any) -> bool:
    """Whether two predictions are equal, comparing dataclass fields and numpy arrays by value."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        return all(same_prediction(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        return x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f" and y.dtype.kind == "f"))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_prediction(x, y) for x, y in zip(a, b))
    return bool(a == b)


def merge_unique(items: Iterable[T], key: Callable[[T], K], *, what: str | None = None) -> tuple[dict[K, T], int]:
    """Indexes items by key, keeping the first occurrence of each key.

    Args:
        items: gathered items, possibly with repeats from sampler padding.
        key: returns the identity of an item (question id, image id, ...).
        what: the name of the key in messages (``"question_id"``). When given, repeats that *differ* from the
            first item (not sampler padding but conflicting predictions) are counted and reported with a
            :class:`UserWarning` saying that the first one is kept.

    Returns:
        ``(by_key, n_dropped)``: the first item for each key, in first-seen order, and the number of repeats
        that were dropped.
    """
    merged: dict[K, T] = {}
    dropped = 0
    conflicts: list[K] = []
    for item in items:
        k = key(item)
        if k in merged:
            dropped += 1
            if what is not None and not same_prediction(merged[k], item):
                conflicts.append(k)
        else:
            merged[k] = item
    if conflicts:
        warnings.warn(
            f"{len(conflicts)} {what}(s) predicted more than once with different values (e.g. {what} "
            f"{conflicts[0]!r}); the first prediction of each is kept, the later ones are ignored",
            stacklevel=2,
        )
    return merged, dropped


def all_gather_concat(per_rank: list[list[Any]]) -> GatherObjects:
    """Builds a fake ``gather`` for tests and offline merges of saved per-rank states.

    Args:
        per_rank: the state items of every rank, in rank order.

    Returns:
        A callable that ignores its argument and returns the concatenation of ``per_rank`` (what a real
        all-gather returns on every rank).
    """
    merged = [item for rank_items in per_rank for item in rank_items]

    def _gather(_items: list[Any]) -> list[Any]:
        return list(merged)

    return _gather
