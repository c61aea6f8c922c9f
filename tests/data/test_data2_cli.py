"""Synthetic referring expressions, ``synth --size``, ``verify DIR``, verify's new checks, and ``stats``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fiber_data import GroundingTransform, MdetrGroundingDataset, SyntheticWorldConfig, generate_world
from fiber_data.cli import main
from fiber_data.stats import dataset_stats, summarize
from fiber_data.synthetic.language import POSITION_WORDS as _POSITION_WORDS
from fiber_data.verify import discover_datasets, split_of, verify_annotations


def _objects_by_file(root: Path, split: str) -> dict[str, list[dict]]:
    data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    name = {im["id"]: im["file_name"] for im in data["images"]}
    out: dict[str, list[dict]] = {}
    for a in data["annotations"]:
        out.setdefault(name[a["image_id"]], []).append(a)
    return out


def _matches(expression: str, obj: dict, others: list[dict]) -> bool:
    """Whether ``obj`` fits ``expression`` under the generator's grammar (shape synonyms included)."""
    at = obj["attributes"]
    synonyms = {"disk": "circle", "block": "square", "rhombus": "diamond", "plus sign": "cross"}
    words = expression.removeprefix("the ")
    for syn, shape in synonyms.items():
        words = words.replace(syn, shape)
    for phrases in _POSITION_WORDS.values():
        for p in phrases:
            if words.endswith(" " + p) and not words.endswith((" on the left", " on the right")):
                words = words.removesuffix(" " + p)
    if at["shape"] not in words.split(" on the ")[0].split():
        return False
    if any(
        c in words.split() and c != at["color"]
        for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    ):
        return False
    if ("small" in words.split() and at["size"] != "small") or ("large" in words.split() and at["size"] != "large"):
        return False
    if words.endswith(" on the left") or words.endswith(" on the right"):
        keys = ("shape", "color", "size") if {"small", "large"} & set(words.split()) else ("shape", "color")
        twins = [o for o in others if all(o["attributes"][k] == at[k] for k in keys)]
        xs = sorted(o["bbox"][0] for o in twins)
        return obj["bbox"][0] == (xs[0] if words.endswith("left") else xs[-1])
    return True


def test_referring_expressions_single_out_one_object(tmp_path: Path) -> None:
    config = SyntheticWorldConfig(
        seed=5,
        image_size=36,
        num_train=30,
        num_val=0,
        num_test=0,
        colors=("red", "blue"),
        shapes=("circle",),
        min_objects=2,
        max_objects=4,
        tokenizer_vocab_size=0,
        vqa_questions_per_image=0,
        nlvr2_statements_per_pair=0,
    )
    root = generate_world(tmp_path / "w", config, progress=False)
    data = json.loads((root / "annotations" / "refexp_train.json").read_text())
    objects = _objects_by_file(root, "train")
    assert len(data["images"]) == len(data["annotations"]) == sum(len(v) for v in objects.values())
    kinds: Counter[str] = Counter()
    for entry, ann in zip(data["images"], data["annotations"]):
        assert ann["image_id"] == entry["id"] and entry["dataset_name"] == "refcoco"
        caption = entry["caption"]
        ((start, end),) = ann["tokens_positive"]
        assert caption[start:end] in ("circle", "disk")  # the head noun
        candidates = objects[entry["file_name"]]
        fitting = [o for o in candidates if _matches(caption, o, candidates)]
        cell = next(
            (pos for pos, phrases in _POSITION_WORDS.items() for p in phrases if caption.endswith(" " + p)), None
        )
        if cell is not None and not caption.endswith((" on the left", " on the right")):
            # Absolute grid position: one object per cell, so the phrase alone decides.
            fitting = [o for o in fitting if o["attributes"]["position"] == cell]
            kinds["grid position"] += 1
        assert len(fitting) == 1, (caption, candidates)
        assert fitting[0]["bbox"] == ann["bbox"], (caption, [(o["bbox"], o["attributes"]) for o in candidates])
        if cell is None or caption.endswith((" on the left", " on the right")):
            kinds["on the left/right" if " on the " in caption else f"{len(caption.split())} words"] += 1
    assert kinds["on the left/right"] > 0 and kinds["3 words"] > 0  # e.g. "the red circle on the left"
    # The file is MDETR RefCOCO-style grounding that the dataset reads; the flip can be vetoed for left/right.
    ds = MdetrGroundingDataset(
        root / "annotations" / "refexp_train.json",
        root / "images" / "train",
        GroundingTransform((36,), max_size=None, flip_prob=1.0, flip_text="skip"),
    )
    k = next(i for i, c in enumerate(ds.captions) if c.endswith("on the left"))
    boxes, _, _ = ds.annotation(k)
    assert ds[k].caption.endswith("on the left") and np.allclose(ds[k].boxes.numpy(), boxes)


def test_synth_size_scales_splits_and_verify_dir_checks_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "world"
    args = ["synth", "--out", str(out), "--size", "10", "--image-size", "30", "--quiet", "--tokenizer-vocab-size", "0"]
    assert main(args) == 0
    assert "train: 10 images" in capsys.readouterr().out
    manifest = json.loads((out / "world.json").read_text())
    assert (manifest["config"]["num_train"], manifest["config"]["num_val"], manifest["config"]["num_test"]) == (
        10,
        1,
        1,
    )
    assert manifest["splits"]["train"]["referring_expressions"] > 0
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "w2"),
                "--size",
                "10",
                "--num-test",
                "3",
                "--quiet",
                "--tokenizer-vocab-size",
                "0",
                "--image-size",
                "30",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "w2" / "world.json").read_text())["config"]["num_test"] == 3
    capsys.readouterr()

    assert main(["verify", str(out), "--format", "grounding", "--quiet"]) == 0
    listing = capsys.readouterr().out
    for name in ("grounding_train.json", "grounding_val.json", "refexp_test.json", "refexp_train.json"):
        assert f"{name}: " in listing
    assert main(["verify", str(out), "--format", "nlvr2", "--quiet"]) == 0
    assert "nlvr2/train.json" in capsys.readouterr().out
    pairs = dict(discover_datasets("coco-captions", out))
    assert pairs[out / "annotations" / "captions_val.json"] == out / "images" / "val"
    # A broken image in one split fails the whole directory.
    (out / "images" / "val" / sorted(p.name for p in (out / "images" / "val").iterdir())[0]).write_bytes(b"junk")
    assert main(["verify", str(out), "--format", "coco-captions", "--quiet"]) == 1
    assert "cannot decode image" in capsys.readouterr().out
    assert main(["verify", "--format", "coco-captions", "--quiet"]) == 2
    assert main(["verify", str(tmp_path / "empty_dir_missing"), "--format", "karpathy"]) == 1
    assert split_of("v2_OpenEnded_mscoco_test-dev2015_questions.json") == "test2015"
    assert split_of("final_flickr_separateGT_val.json") == "val"


def test_verify_flags_empty_captions_degenerate_boxes_and_spans(tiny_world: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_world / "annotations" / "grounding_val.json").read_text())
    data["images"][0]["caption"] = "   "
    first_of_1 = next(j for j, a in enumerate(data["annotations"]) if a["image_id"] == data["images"][1]["id"])
    data["annotations"][first_of_1]["tokens_positive"] = [[0, 10_000]]
    data["annotations"][5]["bbox"] = [3.0, 4.0, 0.5, 9.0]
    data["annotations"][6]["bbox"] = [40.0, 4.0, 20.0, 9.0]
    bad = tmp_path / "grounding_bad.json"
    bad.write_text(json.dumps(data))
    report = verify_annotations("grounding", bad, tiny_world / "images" / "val", check_images=False)
    messages = [str(e) for e in report.errors]
    assert any("images[0]" in m and "'caption' is empty" in m for m in messages)
    assert any(f"annotations[{first_of_1}]" in m and "outside the caption" in m for m in messages)
    assert any("annotations[6]" in m and "outside the 48x48 image" in m for m in messages)
    assert [str(w) for w in report.warnings] == [
        f"{bad}: record annotations[5]: degenerate bbox [3.0, 4.0, 0.5, 9.0] (width or height <= 1 pixel; the "
        "loaders drop it)"
    ]


def test_verify_flags_nan_and_infinite_boxes(tiny_world: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_world / "annotations" / "instances_val.json").read_text())
    data["annotations"][0]["bbox"][0] = float("nan")  # json writes the NaN literal that json.loads reads back
    data["annotations"][1]["bbox"][3] = float("inf")
    bad = tmp_path / "instances_bad.json"
    bad.write_text(json.dumps(data))
    report = verify_annotations("coco-detection", bad, tiny_world / "images" / "val", check_images=False)
    messages = [str(e) for e in report.errors]
    assert any("annotations[0]" in m and "four finite numbers" in m and "nan" in m for m in messages), messages
    assert any("annotations[1]" in m and "four finite numbers" in m and "inf" in m for m in messages), messages


def test_stats_numbers_match_a_direct_count(tiny_world: Path, tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    ann = tiny_world / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    stats = dataset_stats("coco-detection", ann, tiny_world / "images" / "train")
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert stats["num_images"] == len(data["images"]) and stats["num_boxes"] == len(data["annotations"])
    assert stats["boxes_per_image"]["histogram"] == {
        str(k): v for k, v in sorted(Counter(per_image[im["id"]] for im in data["images"]).items())
    }
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert stats["class_frequency"] == dict(
        sorted(Counter(names[a["category_id"]] for a in data["annotations"]).items(), key=lambda kv: (-kv[1], kv[0]))
    )
    assert stats["image_width"]["min"] == stats["image_width"]["max"] == 48 and stats["missing_images"] == 0

    caps = tiny_world / "annotations" / "captions_val.json"
    texts = [a["caption"] for a in json.loads(caps.read_text())["annotations"]]
    words = dataset_stats("coco-captions", caps)
    assert words["text_length"]["unit"] == "words" and words["num_texts"] == len(texts)
    assert words["text_length"]["max"] == max(len(t.split()) for t in texts)
    tokens = dataset_stats("coco-captions", caps, tiny_world / "images" / "val", tokenizer=tokenizer)
    expected = [int(tokenizer([t], max_length=512).attention_mask.sum()) for t in texts]
    assert tokens["text_length"]["mean"] == pytest.approx(np.mean(expected))
    assert tokens["image_height"]["count"] == len(json.loads(caps.read_text())["images"])  # read from the files

    assert main(["stats", "--format", "nlvr2", "--ann", str(tiny_world / "nlvr2" / "val.json"), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    lines = (tiny_world / "nlvr2" / "val.json").read_text().splitlines()
    assert parsed["num_texts"] == len(lines) and parsed["num_images"] == 2 * (6 // 2)
    assert main(["stats", "--format", "coco-detection", "--ann", str(ann)]) == 0
    assert "boxes per image" in capsys.readouterr().out
    assert summarize([]) == {"count": 0} and summarize([1, 3])["mean"] == 2.0
