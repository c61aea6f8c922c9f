"""Retrieval R@K: hand-computed cases, a brute-force sort reference, ties, sharding and gather."""

from __future__ import annotations

import numpy as np
import pytest

from fiber_eval.distributed import all_gather_concat
from fiber_eval.retrieval import RetrievalEvaluator, flatten_captions, recall_at_k, retrieval_ranks
from fiber_eval.types import RankingScores


def _brute_force(scores: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Reference by explicit stable sorting of every row and column."""
    n_img, n_txt = scores.shape
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            top = np.argsort(-scores[i], kind="stable")[:k]
            hits += any(t2i[t] == i for t in top)
        out[f"i2t/R@{k}"] = 100.0 * hits / n_img
    for k in ks:
        hits = 0
        for t in range(n_txt):
            top = np.argsort(-scores[:, t], kind="stable")[:k]
            hits += t2i[t] in top
        out[f"t2i/R@{k}"] = 100.0 * hits / n_txt
    out["rsum"] = sum(out.values())
    return out


def test_hand_computed_two_captions_per_image() -> None:
    # 3 images, 6 texts; texts 2i and 2i+1 belong to image i.
    t2i = np.array([0, 0, 1, 1, 2, 2])
    s = np.array(
        [
            [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption 1 ranks first -> hit@1
            [0.9, 0.0, 0.1, 0.2, 0.0, 0.0],  # image 1: best own caption (3, 0.2) is 2nd -> hit@5 only
            [0.5, 0.6, 0.7, 0.8, 0.1, 0.0],  # image 2: best own caption (4) is 5th -> hit@5
        ]
    )
    m = recall_at_k(s, t2i, ks=(1, 5))
    assert m["i2t/R@1"] == pytest.approx(100 / 3)
    assert m["i2t/R@5"] == pytest.approx(100.0)
    # columns: t0 -> image 1 wins (0.9) miss@1; t1 -> image 0 hit; t2 -> image 0 (0.8) beats image 1 (0.1);
    # t3 -> image 2 (0.8) beats image 1 (0.2); t4 -> image 2 (0.1) hit; t5 -> all zero: tie, image 0 first.
    assert m["t2i/R@1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i/R@5"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(100 / 3 + 100 + 100 / 3 + 100)


def test_ties_broken_by_index() -> None:
    s = np.zeros((3, 3), dtype=np.float16)
    t2i = np.array([0, 1, 2])
    i2t, t2i_ranks = retrieval_ranks(s, t2i)
    # all scores equal: image i's caption i sits at index i, so its rank is i (stable order by index)
    np.testing.assert_array_equal(i2t, [0, 1, 2])
    np.testing.assert_array_equal(t2i_ranks, [0, 1, 2])
    m = recall_at_k(s, t2i, ks=(1, 2))
    assert m["i2t/R@1"] == pytest.approx(100 / 3)
    assert m["t2i/R@2"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img = 7
    t2i = np.concatenate([np.arange(n_img), rng.integers(0, n_img, size=14)])
    rng.shuffle(t2i)
    scores = rng.integers(0, 4, size=(n_img, t2i.size)).astype(np.float32)  # many ties
    ks = (1, 2, 5, 10)
    got = recall_at_k(scores, t2i, ks)
    ref = _brute_force(scores, t2i, ks)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key]), key


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="finite"):
        recall_at_k(np.array([[np.nan, 1.0]]), np.array([0, 0]))
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(np.ones((2, 2)), np.array([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(np.ones((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(np.ones((1, 1)), np.array([0]), ks=(0,))


def test_evaluator_shards_and_gather_equal_single_rank() -> None:
    rng = np.random.default_rng(3)
    n_img, n_txt = 5, 15
    t2i = np.arange(n_txt) % n_img
    scores = rng.integers(0, 3, size=(n_img, n_txt)).astype(np.float32)
    ids = np.arange(n_txt)
    full = RetrievalEvaluator(ks=(1, 5))
    full.update([RankingScores(scores, t2i, text_ids=list(ids))])
    expected = full.compute()
    assert expected == {**recall_at_k(scores, t2i, (1, 5)), "num_images": 5.0, "num_texts": 15.0}

    # DistributedSampler-style interleaved shards; rank 1 pads with a repeat of text 0
    r0 = ids[0::2]
    r1 = np.r_[ids[1::2], 0]
    ranks = []
    for shard in (r0, r1):
        ev = RetrievalEvaluator(ks=(1, 5))
        half = len(shard) // 2
        for part in (shard[:half], shard[half:]):  # two update() calls per rank
            ev.update([RankingScores(scores[:, part], t2i[part], text_ids=list(part))])
        ranks.append(ev)
    gather = all_gather_concat([ev.state() for ev in ranks])
    for ev in ranks:
        assert ev.compute(gather) == expected


def test_evaluator_rejects_mismatched_images() -> None:
    ev = RetrievalEvaluator()
    ev.update([RankingScores(np.ones((2, 2)), np.array([0, 1]), image_ids=[1, 2])])
    ev.update([RankingScores(np.ones((2, 2)), np.array([0, 1]), image_ids=[2, 1])])
    with pytest.raises(ValueError, match="block 1"):
        ev.compute()
    with pytest.raises(TypeError, match="item 0"):
        ev.update([np.ones((2, 2))])  # pyright: ignore[reportArgumentType]  # wrong type on purpose


def test_flatten_captions_dedup_mode() -> None:
    caps = [["a dog", "a dog", "dog"], ["a cat"]]
    texts, t2i = flatten_captions(caps)
    assert texts == ["a dog", "a dog", "dog", "a cat"] and t2i.tolist() == [0, 0, 0, 1]
    texts, t2i = flatten_captions(caps, deduplicate=True)
    assert texts == ["a dog", "dog", "a cat"] and t2i.tolist() == [0, 0, 1]
