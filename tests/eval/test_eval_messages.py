"""What ``fiber-eval`` says about bad inputs (issue 21, item 10): missing or empty VQA predictions name the
file and ``--partial``; a malformed caption file is named once; a non-npz retrieval input gets a plain message;
``boxes: []`` for a Flickr30k sentence without a boxed phrase is skipped and counted; conflicting duplicate
predictions are warned about, saying which one is kept."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import write_entities

from fiber_eval.cli import main
from fiber_eval.types import VQAAnswer
from fiber_eval.vqa import VQAAnnotation, VQAEvaluator


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _vqa_gt(tmp_path: Path) -> Path:
    anns = [{"question_id": q, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"} for q in (1, 2, 3)]
    return _write(tmp_path / "ann.json", {"annotations": anns})


def test_vqa_missing_and_empty_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = _vqa_gt(tmp_path)
    part = _write(tmp_path / "part.json", [{"question_id": 1, "answer": "yes"}])
    assert main(["vqa", "--pred", str(part), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{part}: 2 annotated question(s) of {gt} have no prediction (e.g. [2, 3])" in err
    assert "pass --partial" in err and "strict=False" not in err
    assert main(["vqa", "--pred", str(part), "--gt", str(gt), "--partial"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["num_questions"] == 1.0
    empty = _write(tmp_path / "empty.json", [])
    for extra in ([], ["--partial"]):
        assert main(["vqa", "--pred", str(empty), "--gt", str(gt), *extra]) == 2
        assert f"error: {empty}: no predictions" in capsys.readouterr().err
    # the API keeps naming its own keyword
    ev = VQAEvaluator([VQAAnnotation(1, ("yes",)), VQAAnnotation(2, ("no",))])
    ev.update([VQAAnswer(1, "yes")])
    with pytest.raises(ValueError, match="1 annotated question.*strict=False"):
        ev.compute()


def test_nlvr2_missing_and_empty_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = tmp_path / "dev.json"
    gt.write_text("\n".join(json.dumps({"identifier": f"dev-1-{p}-0", "label": "True"}) for p in range(3)))
    part = _write(tmp_path / "part.json", {"dev-1-0-0": "True"})
    assert main(["nlvr2", "--pred", str(part), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert f"{part}: 2 NLVR2 statement(s) of {gt} have no prediction" in err and "pass --partial" in err
    empty = _write(tmp_path / "empty.json", [])
    assert main(["nlvr2", "--pred", str(empty), "--gt", str(gt), "--partial"]) == 2
    assert f"error: {empty}: nlvr2_metrics: no predictions" in capsys.readouterr().err


def test_malformed_caption_file_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = _write(tmp_path / "refs.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    bad = _write(tmp_path / "captions.json", [{"image_id": 1, "text": "a dog"}])
    assert main(["caption", "--pred", str(bad), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert err.count(str(bad)) == 1 and f"{bad}: record 0: missing key(s) ['caption']" in err


def test_retrieval_refuses_non_npz_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pickled = tmp_path / "scores.npz"
    pickled.write_bytes(pickle.dumps({"scores": [[1.0]]}))
    text = tmp_path / "scores.txt"
    text.write_text("0.1 0.2\n")
    npy = tmp_path / "scores.npy"
    np.save(npy, np.zeros((2, 2)))
    for path in (pickled, text, npy):
        assert main(["retrieval", "--pred", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: not an .npz archive; save the scores with numpy.savez" in err
        assert "allow_pickle" not in err
    objects = tmp_path / "objects.npz"
    np.savez(objects, scores=np.array([object(), object()], dtype=object), text_to_image=np.arange(2))
    assert main(["retrieval", "--pred", str(objects)]) == 2
    err = capsys.readouterr().err
    assert "holds pickled (object) arrays" in err and "allow_pickle" not in err


def _entities(tmp_path: Path) -> Path:
    xml = (
        "<annotation><object><name>7</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>10</xmax><ymax>10</ymax>"
        "</bndbox></object><object><name>8</name><nobndbox>1</nobndbox></object></annotation>"
    )
    sentences = "[/EN#7/people A man] sits .\n[/EN#8/scene A room] .\n"
    return write_entities(tmp_path / "entities", "42", xml, sentences)


def test_flickr_sentence_without_boxed_phrase_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _entities(tmp_path)
    recs = [
        {"image_id": "42", "sentence_index": 0, "boxes": [[[0, 0, 10, 10]]]},
        {"image_id": "42", "sentence_index": 1, "boxes": []},  # MDETR files hold such records
    ]
    pred = _write(tmp_path / "p.json", recs)
    out = tmp_path / "m.json"
    assert main(["flickr30k", "--pred", str(pred), "--gt", str(root), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["metrics"]["R@1"] == 100.0 and saved["metrics"]["num_phrases"] == 1.0
    assert saved["metrics"]["num_skipped_sentences"] == 1.0
    assert saved["skipped"] == {
        "sentences without a boxed phrase": "1 record(s) with boxes: [] skipped, as the MDETR files do"
    }
    # a box list for that sentence is still an error, and so is an unknown sentence
    bad = _write(tmp_path / "b.json", [recs[0], {**recs[1], "boxes": [[[0, 0, 1, 1]]]}])
    assert main(["flickr30k", "--pred", str(bad), "--gt", str(root)]) == 2
    assert "record 1: image 42 sentence 1: 1 box lists for 0 evaluated phrases" in capsys.readouterr().err
    bad = _write(tmp_path / "c.json", [recs[0], {**recs[1], "sentence_index": 5}])
    assert main(["flickr30k", "--pred", str(bad), "--gt", str(root)]) == 2
    assert "sentence 5, which is not an evaluated sentence" in capsys.readouterr().err


def test_conflicting_duplicates_warn_first_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = _vqa_gt(tmp_path)
    recs = [{"question_id": q, "answer": "yes"} for q in (1, 2, 3)]
    same = _write(tmp_path / "same.json", [*recs, recs[0]])  # sampler padding: identical repeat, no warning
    assert main(["vqa", "--pred", str(same), "--gt", str(gt)]) == 0
    assert capsys.readouterr().err == ""
    conflict = _write(tmp_path / "conflict.json", [*recs, {"question_id": 2, "answer": "no"}])
    assert main(["vqa", "--pred", str(conflict), "--gt", str(gt)]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["metrics"]["accuracy"] == 100.0  # the first answer ("yes") is scored
    assert cap.err == (
        "fiber-eval: warning: 1 question_id(s) predicted more than once with different values (e.g. question_id 2); "
        "the first prediction of each is kept, the later ones are ignored\n"
    )
    ev = VQAEvaluator([VQAAnnotation(1, ("yes",) * 10)])
    ev.update([VQAAnswer(1, "yes"), VQAAnswer(1, "no")])
    with pytest.warns(UserWarning, match="question_id 1.*first prediction of each is kept"):
        assert ev.compute()["accuracy"] == 100.0
    ev.reset()
    ev.update([VQAAnswer(1, "yes"), VQAAnswer(1, "yes")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.compute()


def test_debug_shows_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gt = _vqa_gt(tmp_path)
    empty = _write(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match="no predictions"):
        main(["vqa", "--pred", str(empty), "--gt", str(gt), "--debug"])
    monkeypatch.setenv("FIBER_DEBUG", "1")
    with pytest.raises(ValueError, match="no predictions"):
        main(["vqa", "--pred", str(empty), "--gt", str(gt)])
    monkeypatch.setenv("FIBER_DEBUG", "0")
    assert main(["vqa", "--pred", str(empty), "--gt", str(gt)]) == 2
