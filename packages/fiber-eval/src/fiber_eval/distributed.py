"""Merging evaluator state across processes through an injected ``gather`` callable.

Evaluators never import ``torch.distributed``: the trainer passes a callable with the semantics of
``all_gather_object`` flattened to one list (see :data:`fiber_eval.types.GatherObjects`). Distributed samplers
may pad the last batch by repeating samples; :func:`merge_unique` drops such repeats by key, so padded
items are never counted twice (evaluation.md §4.2, "must not be padded/duplicated").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

from fiber_eval.types import GatherObjects

T = TypeVar("T")

__all__ = ["all_gather_concat", "gather_items", "merge_unique"]


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


def merge_unique(items: Iterable[T], key: Callable[[T], Hashable]) -> tuple[dict[Hashable, T], int]:
    """Indexes items by key, keeping the first occurrence of each key.

    Args:
        items: gathered items, possibly with repeats from sampler padding.
        key: returns the identity of an item (question id, image id, ...).

    Returns:
        ``(by_key, n_dropped)``: the first item for each key, in first-seen order, and the number of repeats
        that were dropped.
    """
    merged: dict[Hashable, T] = {}
    dropped = 0
    for item in items:
        k = key(item)
        if k in merged:
            dropped += 1
        else:
            merged[k] = item
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
