"""Visual Genome and CC3M/SBU readers, and the concatenation with global indices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fiber_data import AnnotationError, CocoCaptionsDataset, ImageTextDataset, ImageTransform
from fiber_data.sources.cc_sbu import read_annot_pairs
from fiber_data.sources.concat import ConcatImageTextDataset
from fiber_data.sources.visual_genome import read_visual_genome

T = ImageTransform(8)


def test_visual_genome_regions(tmp_path: Path) -> None:
    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K_2").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "VG_100K" / "61.jpg")
    Image.new("RGB", (5, 5)).save(tmp_path / "VG_100K_2" / "62.jpg")
    data = [
        {"id": 61, "regions": [{"phrase": "blue umbrella"}, {"phrase": "empty chair"}, {"phrase": "blue umbrella"}]},
        {"id": 62, "regions": [{"phrase": "a dog"}]},
        {"id": 63, "regions": []},
    ]
    (tmp_path / "r.json").write_text(json.dumps(data))
    table = read_visual_genome(tmp_path / "r.json", [tmp_path / "VG_100K", tmp_path / "VG_100K_2"])
    assert table.image_ids.tolist() == [61, 62] and table.image_paths[1].endswith("VG_100K_2/62.jpg")
    ds = ImageTextDataset(table, T)
    assert [ds.caption(i) for i in range(len(ds))] == ["blue umbrella", "empty chair", "a dog"]  # dedup per image
    assert ds[2].image_id == 62
    data[1]["regions"][0] = {"text": "x"}
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"record \[1\]\.regions\[0\]: missing field 'phrase'"):
        read_visual_genome(tmp_path / "r.json", [tmp_path / "VG_100K"])


def test_cc_sbu_pairs(tmp_path: Path) -> None:
    (tmp_path / "images_train" / "0012").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(tmp_path / "images_train" / "0012" / "0012345", format="PNG")  # no extension
    pairs = [
        ["images_train/0012/0012345", "a lighthouse"],
        ["images_train/0012/0012346", "dead url"],
        ["x/0012345", "again"],
    ]
    (tmp_path / "annot.json").write_text(json.dumps(pairs))
    table = read_annot_pairs(tmp_path / "annot.json", tmp_path / "images_train")
    assert table.texts == ["a lighthouse", "again"] and table.text_to_image.tolist() == [0, 0]
    assert ImageTextDataset(table, T)[0].image.shape == (3, 8, 8)
    (tmp_path / "bad.json").write_text(json.dumps([["only one"]]))
    with pytest.raises(AnnotationError, match=r"bad\.json: record \[0\]"):
        read_annot_pairs(tmp_path / "bad.json", tmp_path)


def test_concat_rewrites_index_and_ids(tiny_world: Path) -> None:
    a = CocoCaptionsDataset(tiny_world / "annotations" / "captions_val.json", tiny_world / "images" / "val", T)
    b = CocoCaptionsDataset(tiny_world / "annotations" / "captions_test.json", tiny_world / "images" / "test", T)
    both = ConcatImageTextDataset([a, b])
    assert len(both) == len(a) + len(b) == 36
    s = both[20]
    assert s.index == 20 and s.caption == b.caption(2) and s.image_id == f"1:{b.image_id(2)}"
    assert both.locate(17) == (0, 17) and both.locate(18) == (1, 0)
    with pytest.raises(IndexError):
        both[36]
