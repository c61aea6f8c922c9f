"""The synthetic world's VQAv2 and NLVR2 files: answers and labels agree with the drawn objects."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fiber_data import ImageTransform, NLVR2Dataset, VQAv2Dataset, build_answer_vocab, verify_annotations
from fiber_data.synthetic.config import SYNTHETIC_VQA_TEMPLATE

NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def _objects(world: Path, split: str) -> tuple[dict[int, list[dict]], dict[int, str]]:
    inst = json.loads((world / "annotations" / f"instances_{split}.json").read_text())
    objs: dict[int, list[dict]] = {im["id"]: [] for im in inst["images"]}
    for ann in inst["annotations"]:
        objs[ann["image_id"]].append(ann["attributes"])
    return objs, {im["id"]: im["file_name"] for im in inst["images"]}


def test_vqa_answers_match_the_objects(tiny_world: Path) -> None:
    objs, _ = _objects(tiny_world, "train")
    qs = json.loads((tiny_world / "annotations" / "vqa_questions_train.json").read_text())["questions"]
    anns = {
        a["question_id"]: a
        for a in json.loads((tiny_world / "annotations" / "vqa_annotations_train.json").read_text())["annotations"]
    }
    assert len(qs) == 3 * len(objs)
    for q in qs:
        o = objs[q["image_id"]]
        ann = anns[q["question_id"]]
        answer, text = ann["multiple_choice_answer"], q["question"]
        assert len(ann["answers"]) == 10 and sum(a["answer"] == answer for a in ann["answers"]) >= 8
        if text == "How many shapes are there?":
            assert answer == str(len(o))
        elif m := re.fullmatch(r"What color is the (\w+)\?", text):
            assert [x["color"] for x in o if x["shape"] == m[1]] == [answer]
        elif m := re.fullmatch(r"What shape is in the (.+)\?", text):
            assert [x["shape"] for x in o if x["position"] == m[1]] == [answer]
        elif m := re.fullmatch(r"Is the (\w+) (\w+) large or small\?", text):
            assert [x["size"] for x in o if (x["color"], x["shape"]) == (m[1], m[2])] == [answer]
        elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", text):
            assert answer == ("yes" if any((x["color"], x["shape"]) == (m[1], m[2]) for x in o) else "no")
        else:
            raise AssertionError(f"unexpected question {text!r}")
    vocab = build_answer_vocab([tiny_world / "annotations" / "vqa_annotations_train.json"], min_count=1)
    ds = VQAv2Dataset(
        tiny_world / "annotations" / "vqa_questions_val.json",
        tiny_world / "annotations" / "vqa_annotations_val.json",
        tiny_world / "images" / "val",
        ImageTransform(16),
        vocab,
        image_template=SYNTHETIC_VQA_TEMPLATE,
    )
    assert len(ds) > 0 and ds[0].image.shape == (3, 16, 16)


def test_nlvr2_labels_match_the_objects(tiny_world: Path) -> None:
    objs, files = _objects(tiny_world, "train")
    ordered = [objs[i] for i in sorted(objs)]
    names = [files[i] for i in sorted(files)]
    ds = NLVR2Dataset(
        tiny_world / "nlvr2" / "train.json", tiny_world / "nlvr2" / "images" / "train", ImageTransform(16)
    )
    assert len(ds) == 2 * (16 // 2)
    for k in range(len(ds)):
        pair = int(ds.identifiers[k].split("-")[2])
        left, right = ordered[2 * pair], ordered[2 * pair + 1]
        assert Path(ds.left[k]).read_bytes() == (tiny_world / "images" / "train" / names[2 * pair]).read_bytes()
        s = ds.sentences[k]
        if m := re.fullmatch(r"The left image contains (more|fewer) shapes than the right image\.", s):
            truth = len(left) > len(right) if m[1] == "more" else len(left) < len(right)
        elif s == "Both images contain the same number of shapes.":
            truth = len(left) == len(right)
        elif m := re.fullmatch(r"Both images contain a (\w+) shape\.", s):
            truth = any(x["color"] == m[1] for x in left) and any(x["color"] == m[1] for x in right)
        elif m := re.fullmatch(r"The right image contains a (\w+)\.", s):
            truth = any(x["shape"] == m[1] for x in right)
        elif m := re.fullmatch(r"There are (\w+) shapes in total\.", s):
            truth = NUMBERS.get(m[1], -1) == len(left) + len(right)
        else:
            raise AssertionError(f"unexpected statement {s!r}")
        assert ds[k].label is truth, s


def test_world_files_verify_clean(tiny_world: Path) -> None:
    for split in ("train", "val", "test"):
        for fmt, name in (("coco-captions", "captions"), ("coco-detection", "instances"), ("grounding", "grounding")):
            report = verify_annotations(
                fmt, tiny_world / "annotations" / f"{name}_{split}.json", tiny_world / "images" / split
            )
            assert report.ok, report.errors[:3]
