"""The synthetic world: determinism, idempotence, and annotations that match the drawn pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiber_data import SyntheticWorldConfig, generate_world, load_world_manifest
from fiber_data.synthetic.config import PALETTE, POSITIONS

SMALL = SyntheticWorldConfig(seed=0, image_size=36, num_train=5, num_val=2, num_test=2, tokenizer_vocab_size=300)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = _hashes(generate_world(tmp_path / "a", SMALL, progress=False))
    b = _hashes(generate_world(tmp_path / "b", SMALL, progress=False))
    assert a == b
    assert len([k for k in a if k.startswith("images/")]) == 9
    c = _hashes(generate_world(tmp_path / "c", SyntheticWorldConfig(**{**SMALL.to_dict(), "seed": 1}), progress=False))
    assert set(a) == set(c)  # same layout and file names ...
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) >= 8  # ... different pictures


def test_idempotent_and_regenerates_on_config_change(tmp_path: Path) -> None:
    root = generate_world(tmp_path, SMALL, progress=False)
    stamp = (root / "world.json").stat().st_mtime_ns
    first = _hashes(root)
    generate_world(root, SMALL, progress=False)
    assert (root / "world.json").stat().st_mtime_ns == stamp  # nothing rewritten
    # A damaged annotation file is detected and the world is rebuilt identically.
    (root / "annotations" / "captions_val.json").write_text("{}")
    generate_world(root, SMALL, progress=False)
    assert _hashes(root) == first
    bigger = SyntheticWorldConfig(**{**SMALL.to_dict(), "num_train": 7})
    generate_world(root, bigger, progress=False)
    manifest = load_world_manifest(root)
    assert manifest is not None and manifest["splits"]["train"]["images"] == 7
    assert len(list((root / "images" / "train").iterdir())) == 7


def test_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_world(tmp_path, SMALL, progress=False)
    generate_world(tmp_path, SMALL, progress=False, overwrite=True)
    assert load_world_manifest(tmp_path) is not None


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticWorldConfig(min_objects=2, max_objects=1)
    with pytest.raises(ValueError, match="unknown colours"):
        SyntheticWorldConfig(colors=("teal",))
    assert SyntheticWorldConfig.from_dict(SMALL.to_dict()) == SMALL


def test_manifest_counts_match_files(tiny_world: Path) -> None:
    manifest = load_world_manifest(tiny_world)
    assert manifest is not None
    for split, counts in manifest["splits"].items():
        caps = json.loads((tiny_world / "annotations" / f"captions_{split}.json").read_text())
        inst = json.loads((tiny_world / "annotations" / f"instances_{split}.json").read_text())
        assert counts["images"] == len(caps["images"]) == len(list((tiny_world / "images" / split).iterdir()))
        assert counts["captions"] == len(caps["annotations"]) == 3 * counts["images"]
        assert counts["objects"] == len(inst["annotations"])
    all_ids = [
        im["id"]
        for split in ("train", "val", "test")
        for im in json.loads((tiny_world / "annotations" / f"captions_{split}.json").read_text())["images"]
    ]
    assert len(all_ids) == len(set(all_ids))  # unique across splits


def test_boxes_are_tight_around_pixels_of_the_category_colour(tiny_world: Path) -> None:
    checked = 0
    for split in ("train", "val"):
        inst = json.loads((tiny_world / "annotations" / f"instances_{split}.json").read_text())
        cats = {c["id"]: c["name"] for c in inst["categories"]}
        files = {im["id"]: im for im in inst["images"]}
        for ann in inst["annotations"]:
            im = files[ann["image_id"]]
            pixels = np.asarray(Image.open(tiny_world / "images" / split / im["file_name"]).convert("RGB"))
            x, y, w, h = (int(v) for v in ann["bbox"])
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= im["width"] and y + h <= im["height"]
            color, shape = cats[ann["category_id"]].split(" ")
            assert (color, shape) == (ann["attributes"]["color"], ann["attributes"]["shape"])
            # Pixels of exactly this colour inside the box grown by 1 px span exactly the box.
            x0, y0 = max(0, x - 1), max(0, y - 1)
            window = pixels[y0 : y + h + 1, x0 : x + w + 1]
            ys, xs = np.nonzero((window == np.array(PALETTE[color])).all(-1))
            assert (xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1) == (x, y, x + w, y + h)
            # The centre of every shape is filled.
            assert tuple(pixels[y + (h - 1) // 2, x + (w - 1) // 2]) == PALETTE[color]
            # The box lies in the grid cell of the stated position.
            row, col = divmod(POSITIONS.index(ann["attributes"]["position"]), 3)
            s = im["width"]
            assert col * s // 3 <= x and x + w <= (col + 1) * s // 3
            assert row * s // 3 <= y and y + h <= (row + 1) * s // 3
            checked += 1
    assert checked >= 22


def test_captions_name_every_object_and_grounding_spans_point_at_them(tiny_world: Path) -> None:
    inst = json.loads((tiny_world / "annotations" / "instances_train.json").read_text())
    caps = json.loads((tiny_world / "annotations" / "captions_train.json").read_text())
    ground = json.loads((tiny_world / "annotations" / "grounding_train.json").read_text())
    objects: dict[int, list[dict]] = {}
    for ann in inst["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann["attributes"])
    per_image: dict[int, list[str]] = {}
    for ann in caps["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for image_id, texts in per_image.items():
        assert len(set(texts)) == len(texts) == 3  # distinct paraphrases
        for text in texts:
            for obj in objects[image_id]:
                assert obj["color"] in text
    pairs = {im["id"]: im for im in ground["images"]}
    assert len(pairs) == len(caps["annotations"])
    for ann in ground["annotations"]:
        caption = pairs[ann["image_id"]]["caption"]
        ((b, e),) = ann["tokens_positive"]
        phrase = caption[b:e]
        color = inst["categories"][ann["category_id"] - 1]["name"].split(" ")[0]
        assert phrase.split(" ")[1] == color and phrase.split(" ")[0] in {"small", "little", "tiny", "large", "big"}
