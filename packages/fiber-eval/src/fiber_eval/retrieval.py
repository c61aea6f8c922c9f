"""Image–text retrieval recall R@K (docs/reference/evaluation.md §4).

``S[i, t]`` scores image ``i`` against text ``t``; every text has exactly one ground-truth image and an image
usually has several captions.

* **i2t (TR@K, image → text):** an image is a hit at K if *any* of its captions is among the K
  highest-scoring texts of its row; ``TR@K = 100 · hits / N_img``.
* **t2i (IR@K, text → image):** a text is a hit at K if its image is among the K highest-scoring images of
  its column; ``IR@K = 100 · hits / N_txt``.
* ``rsum`` is the sum of all reported recalls (six with the default ``ks``).

Ties are broken by index (stable): among equal scores the lower text/image index ranks first. The ranks
are computed by counting, not by sorting, so no top-k with arbitrary tie order is involved. All values are
percentages in ``[0, 100]`` like the paper's tables, unrounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fiber_eval.distributed import gather_items
from fiber_eval.types import AccumulatingEvaluator, GatherObjects, RankingScores

__all__ = ["RetrievalEvaluator", "flatten_captions", "merge_ranking_blocks", "recall_at_k", "retrieval_ranks"]


def _validate(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N_img, N_txt], got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if text_to_image.shape != (scores.shape[1],):
        raise ValueError(f"text_to_image must have shape ({scores.shape[1]},), got {text_to_image.shape}")
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if scores.size == 0:
        raise ValueError(f"cannot rank an empty score matrix of shape {scores.shape}")
    if text_to_image.min() < 0 or text_to_image.max() >= scores.shape[0]:
        raise ValueError(f"text_to_image holds an index outside [0, {scores.shape[0]})")
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise ValueError(f"scores must be finite; S[{bad[0]}, {bad[1]}] = {scores[bad[0], bad[1]]}")
    if scores.dtype == np.float16:
        # fp32 holds every fp16 value exactly, so ties are preserved; numpy compares fp16 slowly
        scores = scores.astype(np.float32)
    return scores, text_to_image.astype(np.int64)


def retrieval_ranks(
    scores: np.ndarray, text_to_image: np.ndarray, *, chunk_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the ground truth in each row and column of a score matrix.

    Args:
        scores: ``float [N_img, N_txt]`` similarity scores, higher is better.
        text_to_image: ``int [N_txt]`` index of each text's image.
        chunk_size: rows/columns processed at once (bounds memory to ``chunk_size · N`` booleans).

    Returns:
        ``(i2t_ranks [N_img], t2i_ranks [N_txt])``: for each image the rank of its best-ranked caption in its
        row, and for each text the rank of its image in its column. A hit at K is ``rank < K``.

    Raises:
        ValueError: for a malformed matrix or mapping, non-finite scores, or an image without any caption.
    """
    scores, text_to_image = _validate(scores, text_to_image)
    n_img, n_txt = scores.shape
    counts = np.bincount(text_to_image, minlength=n_img)
    if (counts == 0).any():
        missing = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"image index {missing} has no caption in text_to_image; every image needs at least one")

    txt_idx = np.arange(n_txt)
    img_idx = np.arange(n_img)
    gt_scores = scores[text_to_image, txt_idx]  # [N_txt] score of each text with its own image

    # t2i: rank of GT image g in column t = #{i: S[i,t] > S[g,t]} + #{i < g: S[i,t] == S[g,t]}
    t2i = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, chunk_size):
        sl = slice(start, start + chunk_size)
        col = scores[:, sl]  # [N_img, c]
        g = gt_scores[sl][None, :]
        before = img_idx[:, None] < text_to_image[sl][None, :]
        t2i[sl] = (col > g).sum(0) + ((col == g) & before).sum(0)

    # i2t: the best-ranked caption of an image is the one with the highest score, lowest index on ties;
    # lexsort keys are (last = primary) image, then descending score, then ascending text index.
    order = np.lexsort((txt_idx, -gt_scores.astype(np.float64), text_to_image))
    first = np.r_[0, np.cumsum(counts)[:-1]]
    best_txt = order[first]  # [N_img]
    best_score = gt_scores[best_txt]
    i2t = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, chunk_size):
        sl = slice(start, start + chunk_size)
        row = scores[sl]  # [c, N_txt]
        b = best_score[sl][:, None]
        before = txt_idx[None, :] < best_txt[sl][:, None]
        i2t[sl] = (row > b).sum(1) + ((row == b) & before).sum(1)
    return i2t, t2i


def recall_at_k(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image→text and text→image recall at K, in percent.

    Args:
        scores: ``float [N_img, N_txt]`` similarity scores, higher is better (any real dtype; fp16 ties are
            kept as ties).
        text_to_image: ``int [N_txt]`` index (row of ``scores``) of each text's image.
        ks: the cut-offs K.

    Returns:
        ``{"i2t/R@K": TR@K, ..., "t2i/R@K": IR@K, ..., "rsum": sum of all of them}``, each in ``[0, 100]``.

    Raises:
        ValueError: for a malformed input (see :func:`retrieval_ranks`) or a K < 1.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    i2t, t2i = retrieval_ranks(scores, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t/R@{k}"] = 100.0 * float((i2t < k).mean())
    for k in ks:
        out[f"t2i/R@{k}"] = 100.0 * float((t2i < k).mean())
    out["rsum"] = float(sum(out.values()))
    return out


def flatten_captions(
    captions_per_image: Sequence[Sequence[str]], *, deduplicate: bool = False
) -> tuple[list[str], np.ndarray]:
    """Flattens per-image captions into the text list and ``text_to_image`` of a retrieval set.

    Args:
        captions_per_image: the captions of image ``i`` at position ``i``.
        deduplicate: compatibility mode (docs/reference/evaluation.md §4.2): drop repeated caption strings of an image as
            the official loader does (it uses a set; here the first occurrence is kept, so the order is
            deterministic). The default keeps every caption (standard protocol). Report ``N_txt`` either way.

    Returns:
        ``(texts [N_txt], text_to_image int [N_txt])``.
    """
    texts: list[str] = []
    owners: list[int] = []
    for i, caps in enumerate(captions_per_image):
        seen: set[str] = set()
        for c in caps:
            if deduplicate:
                if c in seen:
                    continue
                seen.add(c)
            texts.append(c)
            owners.append(i)
    return texts, np.asarray(owners, dtype=np.int64)


def merge_ranking_blocks(blocks: Sequence[RankingScores]) -> RankingScores:
    """Concatenates text shards of one retrieval set along the text axis.

    Every block must hold the same images in the same order (checked through ``image_ids`` when given, else
    through ``N_img``). When all blocks carry ``text_ids``, repeated ids (sampler padding) are dropped and
    texts are ordered by id, which makes tie-breaking independent of the sharding.

    Args:
        blocks: ``RankingScores`` blocks of shape ``[N_img, n_txt_b]``.

    Returns:
        One ``RankingScores`` of shape ``[N_img, N_txt]``.

    Raises:
        ValueError: if there are no blocks or they disagree on the images.
    """
    if not blocks:
        raise ValueError("no RankingScores blocks to merge (was update() called?)")
    n_img = blocks[0].scores.shape[0]
    ref_ids = blocks[0].image_ids
    for b, block in enumerate(blocks):
        if block.scores.shape[0] != n_img:
            raise ValueError(
                f"RankingScores block {b} has {block.scores.shape[0]} images, block 0 has {n_img}; every block "
                "must score all images against a shard of the texts"
            )
        if ref_ids is not None and block.image_ids is not None and list(block.image_ids) != list(ref_ids):
            raise ValueError(f"RankingScores block {b} lists different image_ids (or order) than block 0")
    if len(blocks) == 1 and blocks[0].text_ids is None:
        return blocks[0]
    scores = np.concatenate([np.asarray(b.scores) for b in blocks], axis=1)
    t2i = np.concatenate([np.asarray(b.text_to_image) for b in blocks])
    text_ids: list[Any] | None = None
    id_lists = [b.text_ids for b in blocks if b.text_ids is not None]
    if len(id_lists) == len(blocks):
        ids = [tid for block_ids in id_lists for tid in block_ids]
        first: dict[Any, int] = {}
        for pos, tid in enumerate(ids):
            first.setdefault(tid, pos)
        keep = np.array(sorted(first.values(), key=lambda p: ids[p]), dtype=np.int64)
        scores, t2i = scores[:, keep], t2i[keep]
        text_ids = [ids[p] for p in keep]
    return RankingScores(scores=scores, text_to_image=t2i, image_ids=ref_ids, text_ids=text_ids)


class RetrievalEvaluator(AccumulatingEvaluator[RankingScores]):
    """Accumulates :class:`~fiber_eval.types.RankingScores` text shards and computes R@K.

    Each block scores *all* images against a shard of the texts (``[N_img, n_txt]``); blocks from repeated
    ``update`` calls and from all ranks are concatenated along the text axis before ranking.

    Args:
        ks: the cut-offs K (default 1, 5, 10).

    Example:
        >>> ev = RetrievalEvaluator()
        >>> ev.update([RankingScores(scores=S, text_to_image=t2i)])  # doctest: +SKIP
        >>> ev.compute()["t2i/R@1"]  # doctest: +SKIP
    """

    def __init__(self, ks: Sequence[int] = (1, 5, 10)) -> None:
        self.ks = tuple(int(k) for k in ks)
        self._items: list[RankingScores] = []

    def check(self, prediction: RankingScores, index: int) -> None:
        """Raises ``TypeError`` for an item that is not a ``RankingScores`` block (``[N_img, n_txt]``)."""
        if not isinstance(prediction, RankingScores):
            raise TypeError(
                f"RetrievalEvaluator.update: item {index} is {type(prediction).__name__}, not RankingScores"
            )

    def compute(self, gather: GatherObjects | None = None) -> dict[str, float]:
        """Merges all ranks' blocks and returns the recalls.

        Args:
            gather: injected all-gather of picklable objects (``None`` on one process).

        Returns:
            :func:`recall_at_k`'s metrics plus ``num_images`` and ``num_texts`` (the evaluated N_img and N_txt).
        """
        merged = merge_ranking_blocks(gather_items(self.state(), gather))
        out = recall_at_k(merged.scores, merged.text_to_image, self.ks)
        out["num_images"] = float(merged.scores.shape[0])
        out["num_texts"] = float(merged.scores.shape[1])
        return out
