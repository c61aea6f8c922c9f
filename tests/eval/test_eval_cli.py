"""The fiber-eval CLI on files the test writes: metrics, --out, per-task help, malformed-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fiber_eval.cli import main
from fiber_eval.retrieval import recall_at_k


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _vqa_gt(tmp_path: Path) -> Path:
    anns = [
        {"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": [{"answer": "yes"}] * 10},
        {
            "question_id": 2,
            "answer_type": "number",
            "question_type": "how many",
            "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8,
        },
    ]
    return _write(tmp_path / "ann.json", {"annotations": anns})


def test_vqa_and_out_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = _write(tmp_path / "pred.json", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}])
    out = tmp_path / "sub" / "metrics.json"
    assert main(["vqa", "--pred", str(pred), "--gt", str(_vqa_gt(tmp_path)), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["task"] == "vqa"
    assert saved["metrics"]["accuracy"] == pytest.approx(80.0)  # (1.0 + 0.6) / 2
    assert saved["metrics"]["answer_type/number"] == pytest.approx(60.0)
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == 80.0


def test_malformed_prediction_names_file_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = _write(tmp_path / "pred.json", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answr": "x"}])
    assert main(["vqa", "--pred", str(pred), "--gt", str(_vqa_gt(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "pred.json: record 1" in err and "missing key(s) ['answer']" in err
    # unknown id and missing answers are errors too
    pred = _write(tmp_path / "p2.json", [{"question_id": 1, "answer": "yes"}, {"question_id": 7, "answer": "x"}])
    assert main(["vqa", "--pred", str(pred), "--gt", str(_vqa_gt(tmp_path))]) == 2
    assert "question_id 7" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('[{"question_id": 1,')
    assert main(["vqa", "--pred", str(tmp_path / "broken.json"), "--gt", str(_vqa_gt(tmp_path))]) == 2
    assert "broken.json: invalid JSON at line 1" in capsys.readouterr().err
    assert main(["vqa", "--pred", str(tmp_path / "nope.json"), "--gt", str(_vqa_gt(tmp_path))]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_retrieval_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 8)).astype(np.float32)
    t2i = np.arange(8) // 2
    np.savez(tmp_path / "s.npz", scores=scores, text_to_image=t2i)
    out = tmp_path / "m.json"
    assert main(["retrieval", "--pred", str(tmp_path / "s.npz"), "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    expected = recall_at_k(scores, t2i)
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    assert m["num_texts"] == 8.0
    np.savez(tmp_path / "bad.npz", scores=scores)
    assert main(["retrieval", "--pred", str(tmp_path / "bad.npz")]) == 2


def test_nlvr2_refexp_coco_odinw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dev.json").write_text(
        "\n".join(json.dumps({"identifier": f"dev-1-{p}-0", "label": "True"}) for p in range(2))
    )
    pred = _write(tmp_path / "n.json", {"dev-1-0-0": "True", "dev-1-1-0": "False"})
    out = tmp_path / "n_m.json"
    assert main(["nlvr2", "--pred", str(pred), "--gt", str(tmp_path / "dev.json"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == {"accuracy": 50.0, "consistency": 0.0, "num_statements": 2.0}

    gt = _write(
        tmp_path / "ref.json",
        {
            "images": [{"id": 1, "dataset_name": "refcoco"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [18, 18, 100, 100]}],
        },
    )
    pred = _write(tmp_path / "r.json", [{"image_id": 1, "boxes": [[0, 0, 100, 100]], "scores": [0.5]}])
    for crit, expected in (("giou", 0.0), ("iou", 100.0)):
        out = tmp_path / f"{crit}.json"
        assert main(["refexp", "--pred", str(pred), "--gt", str(gt), "--criterion", crit, "--out", str(out)]) == 0
        assert json.loads(out.read_text())["metrics"][f"{crit}/refcoco/P@1"] == expected

    pytest.importorskip("pycocotools")
    coco_gt = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "x"}],
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "gt.json", coco_gt)
    _write(tmp_path / "a" / "p.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9}])
    _write(tmp_path / "b" / "p.json", [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.9}])
    out = tmp_path / "o.json"
    argv = ["odinw", "--pred", str(tmp_path / "a/p.json"), str(tmp_path / "b/p.json")]
    argv += ["--gt", str(tmp_path / "a/gt.json"), str(tmp_path / "b/gt.json"), "--out", str(out)]
    assert main(argv) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["a/AP"] == pytest.approx(100.0) and m["b/AP"] == 0.0 and m["mean_AP"] == pytest.approx(50.0)
    _write(tmp_path / "bad.json", [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    assert main(["coco", "--pred", str(tmp_path / "bad.json"), "--gt", str(tmp_path / "a/gt.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_flickr30k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "entities"
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "Annotations" / "42.xml").write_text(
        "<annotation><object><name>7</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>10</xmax><ymax>10</ymax>"
        "</bndbox></object></annotation>"
    )
    (root / "Sentences" / "42.txt").write_text("[/EN#7/people A man] sits .\n")
    (root / "val.txt").write_text("42\n")
    pred = _write(
        tmp_path / "p.json", [{"image_id": "42", "sentence_index": 0, "boxes": [[[20, 20, 30, 30], [0, 0, 10, 9]]]}]
    )
    out = tmp_path / "m.json"
    assert main(["flickr30k", "--pred", str(pred), "--gt", str(root), "--split", "val", "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0 and m["R@5/people"] == 100.0
    bad = _write(tmp_path / "b.json", [{"image_id": "42", "sentence_index": 0, "boxes": []}])
    assert main(["flickr30k", "--pred", str(bad), "--gt", str(root), "--split", "val"]) == 2
    assert "b.json: record 0: image 42 sentence 0: 0 box lists for 1" in capsys.readouterr().err


def test_help_lists_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for task in ("vqa", "nlvr2", "retrieval", "caption", "coco", "lvis", "odinw", "flickr30k", "refexp"):
        assert f"  {task}:" in text
    with pytest.raises(SystemExit):
        main(["flickr30k", "--help"])
    assert "sentence_index" in capsys.readouterr().out


def test_package_imports_without_torch() -> None:
    code = (
        "import sys, fiber_eval, fiber_eval.cli\n"
        "bad = [m for m in ('torch', 'pycocotools', 'lvis', 'pycocoevalcap') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
