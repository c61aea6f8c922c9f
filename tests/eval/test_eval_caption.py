"""Caption metrics: our CIDEr-D against the toolkit and by hand, DF cache, PTB/Java handling, SPICE skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fiber_eval.caption as cap
from fiber_eval._io import PredictionFormatError
from fiber_eval.caption import (
    CaptionEvaluator,
    caption_metrics,
    cider_d,
    compute_document_frequencies,
    load_caption_predictions,
    load_caption_references,
    load_document_frequencies,
    save_document_frequencies,
    simple_tokenize,
)
from fiber_eval.distributed import all_gather_concat
from fiber_eval.types import Caption

REFS = {
    1: ["a man riding a horse", "a person on a horse in a field"],
    2: ["two dogs play with a ball", "dogs playing on the grass"],
    3: ["a red car parked on the street", "a car parked near a house"],
}
CANDS = {1: "a man rides a horse", 2: "two dogs playing with a ball", 3: "a blue bus on a road"}
needs_java = pytest.mark.skipif(cap.java_available() is not None, reason="needs a Java runtime")


def test_cider_d_by_hand() -> None:
    refs = {1: ["w1 w2 w3 w4"], 2: ["v1 v2 v3 v4"]}
    # candidate == its single reference and shares no n-gram with the other image: cosine 1 at every order,
    # no length penalty -> mean(1, 1, 1, 1) / 1 ref * 10 = 10
    mean, per = cider_d({1: "w1 w2 w3 w4", 2: "v1 v2 v3 v4"}, refs)
    assert per == pytest.approx({1: 10.0, 2: 10.0})
    # no shared n-gram -> 0
    assert cider_d({1: "x y", 2: "v1 v2 v3 v4"}, refs)[1][1] == 0.0
    # an n-gram present in every document has idf log(2) - log(2) = 0: a candidate made of it scores 0
    assert cider_d({1: "common", 2: "common"}, {1: ["common a"], 2: ["common b"]})[0] == 0.0


def test_cider_d_equals_toolkit() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    gts = simple_tokenize(REFS)
    res = simple_tokenize({k: [v] for k, v in CANDS.items()})
    ref_mean, ref_per = Cider().compute_score(gts, res)
    mean, per = cider_d({k: v[0] for k, v in res.items()}, gts)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert list(per.values()) == pytest.approx(list(ref_per), rel=1e-12)
    assert mean > 0


def test_document_frequency_cache(tmp_path: Path) -> None:
    train = [["a dog runs", "the dog is running"], ["a cat sleeps"], ["a dog sleeps"]]
    dfs = compute_document_frequencies(train)
    assert dfs.num_documents == 3
    assert dfs.df[("a",)] == 3 and dfs.df[("dog",)] == 2 and dfs.df[("a", "dog")] == 2
    assert dfs.df[("the", "dog", "is", "running")] == 1
    path = tmp_path / "coco_train_df.json.gz"
    save_document_frequencies(dfs, path)
    loaded = load_document_frequencies(path)
    assert loaded == dfs
    cands, refs = {1: "a dog sleeps"}, {1: ["a dog sleeps on a mat"]}
    assert cider_d(cands, refs, loaded) == cider_d(cands, refs, dfs)
    # external DF differs from the evaluated set's own DF
    assert cider_d(cands, refs, dfs)[0] != cider_d(cands, refs)[0]
    (tmp_path / "bad.json").write_text(json.dumps({"df": {}}))
    with pytest.raises(PredictionFormatError, match="bad.json"):
        load_document_frequencies(tmp_path / "bad.json")


@needs_java
def test_toolkit_metrics_with_ptb() -> None:
    pytest.importorskip("pycocoevalcap")
    refs = {1: ["A man riding a horse.", "A man rides a horse!"], 2: ["Two dogs, playing.", "Dogs play."]}
    perfect, skipped = caption_metrics(
        {1: "a man riding a horse", 2: "two dogs playing"}, refs, metrics=("BLEU", "ROUGE-L", "CIDEr", "SPICE")
    )
    # PTB lower-cases and drops "." "," "!": the candidates equal one reference of each image exactly
    assert perfect["BLEU-1"] == pytest.approx(100.0, abs=1e-6)
    assert perfect["BLEU-3"] == pytest.approx(100.0, abs=1e-4)
    assert perfect["ROUGE-L"] == pytest.approx(100.0)
    assert skipped == {"SPICE": cap.SPICE_SKIP_REASON}
    worse, _ = caption_metrics({1: "a horse", 2: "two dogs playing"}, refs, metrics=("BLEU", "CIDEr"))
    assert worse["CIDEr"] < perfect["CIDEr"]
    # corpus BLEU-1: unigram precision 1; candidate length 2 + 3 = 5, closest reference lengths 5 + 3 = 8,
    # so the brevity penalty is exp(1 - 8/5)
    assert worse["BLEU-1"] == pytest.approx(100 * 2.718281828459045 ** (1 - 8 / 5), rel=1e-6)


@needs_java
@pytest.mark.slow
def test_meteor_runs() -> None:
    pytest.importorskip("pycocoevalcap")
    # one call (the jar loads its paraphrase table for ~10 s); an exact match scores just under 100
    # (METEOR's fragmentation penalty is never exactly 0)
    good, _ = caption_metrics({1: "a man riding a horse"}, {1: ["a man riding a horse"]}, metrics=("METEOR",))
    assert 90.0 < good["METEOR"] <= 100.0


def test_without_java_metrics_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(cap, "java_available", lambda: "no 'java' executable on PATH")
    scores, skipped = caption_metrics(CANDS, REFS)
    assert scores == {}
    assert set(skipped) == {"BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE"}
    assert "no 'java'" in skipped["METEOR"]
    scores, skipped = caption_metrics(CANDS, REFS, allow_simple_tokenizer=True)
    assert "METEOR" in skipped and "METEOR" not in scores
    gts = simple_tokenize(REFS)
    assert scores["CIDEr"] == pytest.approx(100 * cider_d({k: v.lower() for k, v in CANDS.items()}, gts)[0])


def test_evaluator_gather_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(cap, "java_available", lambda: "disabled in this test")
    kw = {"metrics": ("BLEU", "CIDEr"), "allow_simple_tokenizer": True}
    preds = [Caption(k, v) for k, v in CANDS.items()]
    single = CaptionEvaluator(REFS, **kw)
    single.update(preds)
    expected = single.compute()
    r0, r1 = CaptionEvaluator(REFS, **kw), CaptionEvaluator(REFS, **kw)
    r0.update(preds[:1])
    r1.update([*preds[1:], Caption(1, "a padded duplicate")])
    assert r0.compute(all_gather_concat([r0.state(), r1.state()])) == expected
    with pytest.raises(KeyError, match="99"):
        r0.update([Caption(99, "x")])
    with pytest.raises(ValueError, match="2 missing"):
        r0.compute()
    subset = CaptionEvaluator(REFS, strict=False, **kw)
    subset.update(preds[:1])
    assert subset.compute()["BLEU-1"] > 0


def test_files(tmp_path: Path) -> None:
    (tmp_path / "gt.json").write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a b"}, {"id": 3}]}))
    with pytest.raises(PredictionFormatError, match=r"gt.json: annotations\[1\]"):
        load_caption_references(tmp_path / "gt.json")
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": 1, "caption": None}]))
    with pytest.raises(PredictionFormatError, match=r"record 0 \(image_id=1\)"):
        load_caption_predictions(tmp_path / "p.json")
