"""The custom-dataset guide (docs/guides/custom-dataset.md) works as written: its detection commands, read from
the page, fine-tune and evaluate detection on a generated COCO-format folder."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs/guides/custom-dataset.md"
CLASSES = {1: ("red block", (220, 30, 30)), 2: ("blue block", (30, 60, 220))}
SPLITS = {"train": 8, "val": 4}

# only what keeps the guide's run to seconds on a CPU: fewer steps, smaller images, no progress bar
FAST = [
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "data.min_sizes=[64]",
    "data.test_size=64",
    "data.batch_size=4",
    "eval.batch_size=4",
]


def guide_commands(tag: str) -> list[list[str]]:
    """The shell commands of the ```bash block that follows ``<!-- guide-test: TAG -->`` in the guide."""
    text = GUIDE.read_text()
    m = re.search(rf"<!-- guide-test: {tag} -->\n```bash\n(.*?)^```", text, re.S | re.M)
    assert m, f"{GUIDE}: no ```bash block after <!-- guide-test: {tag} -->"
    lines = [
        ln for ln in m.group(1).replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [shlex.split(ln) for ln in lines]


def write_coco_detection_folder(root: Path) -> None:
    """``root/annotations/instances_{split}.json`` + ``root/images/{split}/*.png``: two classes of filled rectangles."""
    rng = random.Random(0)
    categories = [{"id": c, "name": name, "supercategory": "block"} for c, (name, _) in CLASSES.items()]
    for split, n in SPLITS.items():
        (root / "images" / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(n):
            im = Image.new("RGB", (96, 80), (235, 235, 235))
            draw = ImageDraw.Draw(im)
            for c, (_, colour) in CLASSES.items():
                w, h = rng.randint(16, 34), rng.randint(16, 34)
                x, y = rng.randint(0, 96 - w), rng.randint(0, 80 - h)
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
                box = [x, y, w, h]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": c,
                        "bbox": box,
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            name = f"{split}_{i:03d}.png"
            im.save(root / "images" / split / name)
            images.append({"id": i + 1, "file_name": name, "width": 96, "height": 80})
        (root / "annotations").mkdir(exist_ok=True)
        doc = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def test_guide_detection_commands_fine_tune_on_a_coco_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fiber_data.cli import main as fiber_data
    from fiber_data.text.tokenizer import load_tokenizer
    from fiber_train.cli import main as fiber_train

    monkeypatch.chdir(tmp_path)  # the guide's paths are relative to where the user stands
    write_coco_detection_folder(tmp_path / "my-dataset")
    assert fiber_data(["verify", "my-dataset", "--format", "coco-detection", "--quiet"]) == 0

    commands = guide_commands("detection")
    assert [c[:2] for c in commands] == [["fiber-data", "train-tokenizer"], ["fiber-train", "finetune"]]
    assert commands[1][-2] == "--set"  # FAST extends the guide's --set list
    tokenize, finetune = commands
    with contextlib.redirect_stdout(io.StringIO()):
        assert fiber_data(tokenize[1:]) == 0
    tokenizer = load_tokenizer(tmp_path / "my-dataset" / "tokenizer.json")
    # trained on the class names: each name takes fewer tokens than it has bytes (+ <s> and </s>)
    names = [name for name, _ in CLASSES.values()]
    enc = tokenizer(names, max_length=64, padding="longest")
    assert all(int(n) - 2 < len(name.encode()) for n, name in zip(enc.attention_mask.sum(1), names, strict=True))

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # messages are logged on stderr
        code = fiber_train([*finetune[1:], *FAST, "--out", "runs", "--run-name", "guide"])
    assert code == 0, buf.getvalue()
    run = tmp_path / "runs" / "guide"
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["num_classes"] == len(CLASSES) and metrics["num_images"] == SPLITS["val"]
    assert 0.0 <= metrics["bbox/AP"] <= 100.0
    # the exported model is what `fiber-train predict` and the demo load
    from fiber_models import GroundingModel, load

    assert isinstance(load(run / "model"), GroundingModel)
    assert "detection on val:" in buf.getvalue()
