"""data.on_error: a corrupt training image stops the run with its file named, or is skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fiber_data import SyntheticWorldConfig, generate_world
from fiber_train.cli import main

TINY = [
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=6",  # one epoch of 48 pairs: every image is seen
    "trainer.log_every=1",
    "trainer.progress=false",
    "eval.retrieval=false",
]


@pytest.fixture()
def broken_world(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "w"
    generate_world(root, SyntheticWorldConfig(num_train=16, num_val=2, num_test=4), progress=False)
    ann = json.loads((root / "annotations/captions_train.json").read_text())
    name = ann["images"][0]["file_name"]
    (root / "images/train" / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    # plain COCO-captions data now (without the manifest, nothing regenerates the broken file)
    (root / "world.json").unlink()
    return root, name


def test_corrupt_image_is_one_line_naming_the_file(broken_world, tmp_path: Path, capsys) -> None:
    root, name = broken_world
    rc = main(["coarse", "--data", str(root), "--out", str(tmp_path / "runs"), "--set", *TINY])
    assert rc == 2
    logged = capsys.readouterr().err
    err = [line for line in logged.strip().splitlines() if line.startswith("fiber-train:")]  # not the run's log
    assert len(err) == 1 and name in err[0] and "data.on_error=skip" in err[0] and "Traceback" not in logged
    # --debug (or FIBER_DEBUG=1) shows the traceback instead: the error propagates
    with pytest.raises(Exception, match=name):
        main(["--debug", "coarse", "--data", str(root), "--out", str(tmp_path / "runs2"), "--set", *TINY])


def test_every_image_unreadable_under_skip_stops_instead_of_looping(tmp_path: Path, capsys) -> None:
    root = tmp_path / "w"
    generate_world(root, SyntheticWorldConfig(num_train=16, num_val=2, num_test=4), progress=False)
    (root / "world.json").unlink()
    for png in (root / "images/train").iterdir():  # a wrong image folder: nothing decodes
        png.write_bytes(b"not an image")
    argv = ["coarse", "--data", str(root), "--out", str(tmp_path / "runs"), "--set", *TINY]
    rc = main([*argv, "data.on_error=skip", "trainer.max_skipped_batches=3"])
    assert rc == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every sample of 3 consecutive batches" in err and "train: 24" in err and "images/train/" in err


def test_corrupt_image_is_skipped_and_counted(broken_world, tmp_path: Path, capsys) -> None:
    root, _ = broken_world
    rc = main(
        [
            "coarse",
            "--data",
            str(root),
            "--out",
            str(tmp_path / "runs"),
            "--run-name",
            "r",
            "--set",
            *TINY,
            "data.on_error=skip",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped bad samples (data.on_error=skip): train:" in out
    header = (tmp_path / "runs/r/metrics.csv").read_text().splitlines()[0]
    assert "skipped/train" in header


def test_caption_with_bytes_that_are_not_utf8_is_skipped_and_counted(tmp_path: Path, capsys) -> None:
    root = tmp_path / "w"
    generate_world(root, SyntheticWorldConfig(num_train=16, num_val=2, num_test=4), progress=False)
    (root / "world.json").unlink()
    ann_path = root / "annotations/captions_train.json"
    ann = json.loads(ann_path.read_text())
    first = ann["annotations"][0]["caption"]
    ann["annotations"][0]["caption"] = "@@BAD@@"
    raw = json.dumps(ann).encode().replace(b"@@BAD@@", first.encode() + b" \xff\xfe")
    ann_path.write_bytes(raw)
    argv = ["coarse", "--data", str(root), "--out", str(tmp_path / "runs"), "--set", *TINY]
    assert main(argv) == 2  # the default policy: the file is refused, naming it
    assert "captions_train.json: not UTF-8 text" in capsys.readouterr().err
    assert main([*argv[: -len(TINY) - 1], "--run-name", "r", "--set", *TINY, "data.on_error=skip"]) == 0
    captured = capsys.readouterr()
    assert (
        "repaired or dropped while loading (see the warnings above): train/caption_records_skipped: 1" in captured.out
    )
    header = (tmp_path / "runs/r/metrics.csv").read_text().splitlines()[0]
    assert "repaired/train/caption_records_skipped" in header
