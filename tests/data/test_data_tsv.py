"""Objects365-style TSV bundles read as grounding samples."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest
import torch

from fiber_data import AnnotationError
from fiber_data.formats.tsv import TSVDetectionDataset, write_tsv
from fiber_data.images.transforms import GroundingTransform

T = GroundingTransform((48,), None, 0.0, train=False)


def _bundle(world: Path, tmp_path: Path) -> dict[str, Path]:
    inst = json.loads((world / "annotations" / "instances_val.json").read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    per_image: dict[int, list] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        per_image[a["image_id"]].append({"class": cats[a["category_id"]], "rect": [x, y, x + w - 1, y + h - 1]})
    images, labels, hws = [], [], []
    for im in inst["images"]:
        key = f"synth_{im['id']}"
        blob = (world / "images" / "val" / im["file_name"]).read_bytes()
        images.append((key, base64.b64encode(blob).decode()))
        labels.append((key, json.dumps(per_image[im["id"]])))
        hws.append((key, json.dumps([{"height": im["height"], "width": im["width"]}])))
    (tmp_path / "labelmap.json").write_text(json.dumps({"__background__": 0, **{n: i for i, n in cats.items()}}))
    (tmp_path / "linelist.tsv").write_text("2\n0\n2\n")
    return {
        "image_tsv": write_tsv(tmp_path / "images.tsv", images),
        "label_tsv": write_tsv(tmp_path / "train.label.tsv", labels),
        "hw_tsv": write_tsv(tmp_path / "train.hw.tsv", hws),
        "labelmap": tmp_path / "labelmap.json",
    }


def test_tsv_bundle_matches_the_coco_annotations(tiny_world: Path, tmp_path: Path) -> None:
    files = _bundle(tiny_world, tmp_path)
    ds = TSVDetectionDataset(files["image_tsv"], files["label_tsv"], files["labelmap"], T, hw_tsv=files["hw_tsv"])
    assert len(ds) == 6 and 0 not in ds.label_names and len(ds.label_names) == 40
    inst = json.loads((tiny_world / "annotations" / "instances_val.json").read_text())
    first = [a for a in inst["annotations"] if a["image_id"] == inst["images"][0]["id"]]
    s = ds[0]
    assert s.image_id == f"synth_{inst['images'][0]['id']}" and s.image.shape == (3, 48, 48)
    assert s.labels.tolist() == [a["category_id"] for a in first]
    expected = [[x, y, x + w - 1, y + h - 1] for x, y, w, h in (a["bbox"] for a in first)]
    assert torch.equal(s.boxes, torch.tensor(expected))
    for lab, ((b, e),) in zip(s.labels.tolist(), s.tokens_positive):
        assert s.caption[b:e] == ds.label_names[lab]
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives (no open file handles)
    assert torch.equal(clone[0].image, s.image)
    resampled = TSVDetectionDataset(
        files["image_tsv"], files["label_tsv"], files["labelmap"], T, linelist=tmp_path / "linelist.tsv"
    )
    assert len(resampled) == 3 and resampled[0].image_id == resampled[2].image_id == ds[2].image_id


def test_tsv_errors(tiny_world: Path, tmp_path: Path) -> None:
    files = _bundle(tiny_world, tmp_path)
    lines = files["label_tsv"].read_text().splitlines()
    key = lines[1].split("\t")[0]
    lines[1] = f"{key}\t" + json.dumps([{"class": "unicorn", "rect": [0, 0, 5, 5]}])
    lines[2] = "other_key\t[]"
    write_tsv(files["label_tsv"], [(k, v) for k, v in (x.split("\t", 1) for x in lines)])
    ds = TSVDetectionDataset(files["image_tsv"], files["label_tsv"], files["labelmap"], T)
    with pytest.raises(AnnotationError, match=r"train\.label\.tsv: record line 1: object 0: needs a known 'class'"):
        ds[1]
    with pytest.raises(
        AnnotationError, match=r"images\.tsv: record line 2: image key .* does not match label key 'other_key'"
    ):
        ds[2]
    write_tsv(tmp_path / "short.tsv", [("a", "[]")])
    with pytest.raises(AnnotationError, match="6 image lines but 1 label lines"):
        TSVDetectionDataset(files["image_tsv"], tmp_path / "short.tsv", files["labelmap"], T)
