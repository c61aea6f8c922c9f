"""``fiber-data`` CLI: synth, verify (exit 1 and the broken record listed), train-tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fiber_data import ByteBPETokenizer, load_world_manifest
from fiber_data.cli import main
from fiber_data.verify import verify_annotations

SYNTH = ["--num-train", "4", "--num-val", "2", "--num-test", "2", "--image-size", "30", "--quiet"]


def test_synth_then_verify_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    assert main(["synth", "--out", str(out), "--tokenizer-vocab-size", "300", *SYNTH]) == 0
    assert "train: 4 images / 12 captions" in capsys.readouterr().out
    manifest = load_world_manifest(out)
    assert manifest is not None and manifest["config"]["image_size"] == 30
    ann = out / "annotations"
    for fmt, name, images in [
        ("coco-captions", "captions_train.json", out / "images" / "train"),
        ("coco-detection", "instances_val.json", out / "images" / "val"),
        ("grounding", "grounding_test.json", out / "images" / "test"),
        ("karpathy", "karpathy.json", out / "images"),
    ]:
        assert main(["verify", "--format", fmt, "--ann", str(ann / name), "--images", str(images), "--quiet"]) == 0
        assert "0 errors" in capsys.readouterr().out


def test_verify_lists_every_broken_record(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((tiny_world / "annotations" / "instances_val.json").read_text())
    data["annotations"][1]["bbox"] = [1.0, 2.0, -3.0, 4.0]
    data["annotations"][2]["image_id"] = 424242
    del data["images"][3]["file_name"]
    data["images"][4]["file_name"] = "does_not_exist.png"
    broken = tmp_path / "instances_broken.json"
    broken.write_text(json.dumps(data))
    images = tiny_world / "images" / "val"
    code = main(["verify", "--format", "coco-detection", "--ann", str(broken), "--images", str(images), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert "4 errors" in out
    assert "instances_broken.json: record annotations[1]: bbox has negative width/height" in out
    assert "record annotations[2]: image_id 424242 has no entry in 'images'" in out
    assert "record images[3]: missing field 'file_name'" in out
    assert "does_not_exist.png: record images[4] (instances_broken.json): image file not found" in out
    # --no-images skips the file checks; --max-listed truncates the listing.
    code = main(
        [
            "verify",
            "--format",
            "coco-detection",
            "--ann",
            str(broken),
            "--images",
            str(images),
            "--no-images",
            "--max-listed",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "3 errors" in out and "... and 2 more" in out


def test_verify_corrupt_image_and_bad_json(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "val"
    images.mkdir()
    caps = json.loads((tiny_world / "annotations" / "captions_val.json").read_text())
    for im in caps["images"]:
        (images / im["file_name"]).write_bytes((tiny_world / "images" / "val" / im["file_name"]).read_bytes())
    victim = caps["images"][2]["file_name"]
    (images / victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = verify_annotations("coco-captions", tiny_world / "annotations" / "captions_val.json", images)
    assert [(Path(e.file or "").name, e.record) for e in report.errors] == [(victim, "images[2] (captions_val.json)")]
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    assert main(["verify", "--format", "karpathy", "--ann", str(bad), "--images", str(images), "--quiet"]) == 1
    assert "bad.json: invalid JSON" in capsys.readouterr().out
    # Karpathy sentences are checked one by one.
    kp = json.loads((tiny_world / "annotations" / "karpathy.json").read_text())
    kp["images"][1]["sentences"][2].pop("raw")
    (tmp_path / "kp.json").write_text(json.dumps(kp))
    report = verify_annotations("karpathy", tmp_path / "kp.json", tiny_world / "images")
    assert [e.record for e in report.errors] == ["images[1].sentences[2]"]


def test_train_tokenizer_and_usage_errors(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tok.json"
    ann = tiny_world / "annotations" / "captions_train.json"
    assert main(["train-tokenizer", "--ann", str(ann), "--vocab-size", "350", "--out", str(out)]) == 0
    tok = ByteBPETokenizer.load(out)
    assert 261 < tok.vocab_size <= 350
    captions = [a["caption"] for a in json.loads(ann.read_text())["annotations"]]
    assert tok.merges == ByteBPETokenizer.train(captions, 350).merges
    assert main(["verify", "--format", "nope", "--ann", "x", "--images", "y"]) == 2
    assert main(["synth", "--out", str(tmp_path / "w"), "--min-objects", "5", "--max-objects", "2", "--quiet"]) == 1
    assert "max_objects" in capsys.readouterr().err


def test_train_tokenizer_on_detection_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a COCO detection file has no captions: its texts are the class names the detection prompts are made of
    names = ["red block", "blue block", "traffic cone"]
    det = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    (tmp_path / "instances.json").write_text(json.dumps(det))
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    for src in ("instances.json", "names.txt"):
        args = [
            "train-tokenizer",
            "--ann",
            str(tmp_path / src),
            "--min-frequency",
            "1",
            "--out",
            str(tmp_path / f"{src}.tok"),
        ]
        assert main(args) == 0
    assert (tmp_path / "instances.json.tok").read_bytes() == (tmp_path / "names.txt.tok").read_bytes()
    assert "trained on 3 texts" in capsys.readouterr().out
    # nothing to train on: an error naming the file, no tokenizer written
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert main(["train-tokenizer", "--ann", str(tmp_path / "empty.json"), "--out", str(tmp_path / "e.tok")]) == 1
    assert "empty.json: no text to train a tokenizer on" in capsys.readouterr().err
    assert not (tmp_path / "e.tok").exists()


def test_verify_nlvr2_and_vqa(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nlvr2 = tiny_world / "nlvr2" / "val.json"
    images = tiny_world / "nlvr2" / "images" / "val"
    assert main(["verify", "--format", "nlvr2", "--ann", str(nlvr2), "--images", str(images), "--quiet"]) == 0
    lines = nlvr2.read_text().splitlines()
    broken = [
        lines[0],
        "",
        "{not json",
        json.dumps({"identifier": "val-0-99-0", "sentence": "x", "label": "Maybe"}),
        *lines[1:],
    ]
    (tmp_path / "n.json").write_text("\n".join(broken) + "\n")
    report = verify_annotations("nlvr2", tmp_path / "n.json", images)
    found = sorted((Path(e.file or "").name, str(e.record).split(" (")[0], e.message) for e in report.errors)
    expected = [
        ("n.json", "line 3", "invalid JSON"),
        ("n.json", "line 4", "label should be 'True' or 'False', got 'Maybe'"),
        ("val-0-99-img0.png", "line 4", "image file not found"),
        ("val-0-99-img1.png", "line 4", "image file not found"),
    ]
    assert len(found) == len(expected)
    for got, want in zip(found, expected):
        assert got[:2] == want[:2] and got[2].startswith(want[2])
    vqa = tiny_world / "annotations" / "vqa_questions_val.json"
    args = [
        "verify",
        "--format",
        "vqa-questions",
        "--ann",
        str(vqa),
        "--images",
        str(tiny_world / "images" / "val"),
        "--quiet",
    ]
    assert main(args) == 1  # default COCO_<subtype>_<id>.jpg names do not exist here
    assert "COCO_val_" in capsys.readouterr().out
    assert main([*args, "--image-template", "{subtype}_{image_id:06d}.png"]) == 0
