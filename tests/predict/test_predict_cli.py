"""``fiber-train predict``: outputs equal the predictor/backends computed directly, drawings, input errors.

The runs are built like tests/demo/conftest.py builds them: the training tasks build tiny models with random
weights and export them as a finished run would (``RUN/model``), without training.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import Prompt, SyntheticWorldConfig, generate_world
from fiber_heads.grounding import PostprocessConfig
from fiber_train.predict_cli import _COLORS as COLORS
from fiber_train.predict_cli import draw_boxes, find_images, main
from fiber_train.predictor import GroundingPredictor

WORLD = SyntheticWorldConfig(seed=0, image_size=64, num_train=8, num_val=2, num_test=2, tokenizer_vocab_size=400)
DATA = [
    f"data.synthetic_train={WORLD.num_train}",
    f"data.synthetic_val={WORLD.num_val}",
    f"data.synthetic_test={WORLD.num_test}",
]
SMALL = ["model.hidden_dim=32", "model.itc_dim=32", "data.max_text_len=16"]


def _export(task: Any, out: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        model = task.build_model()
        task.export(model, out / "model")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"fine", "coarse"}`` -> a directory laid out like a finished run."""
    from fiber_train.config import CoarseConfig, load_config
    from fiber_train.tasks.coarse import CoarsePretrainTask
    from fiber_train.tasks.fine import FineConfig, FinePretrainTask

    root = tmp_path_factory.mktemp("predict_runs")
    world = generate_world(root / "synthetic", WORLD, progress=False)
    data = [f"data.root={world}", *DATA]
    fine = load_config(FineConfig, "fine/tiny", [*data, "data.test_size=64", "model.head.num_convs=1"])
    coarse = load_config(CoarseConfig, "coarse/tiny", [*data, *SMALL])
    return {
        "fine": _export(FinePretrainTask(fine), root / "fine"),
        "coarse": _export(CoarsePretrainTask(coarse), root / "coarse"),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two random images of different sizes (one in a sub-folder) and a non-image file."""
    root = tmp_path_factory.mktemp("predict_images")
    g = torch.Generator().manual_seed(1)
    (root / "sub").mkdir()
    for path, (h, w) in [(root / "a.png", (48, 80)), (root / "sub" / "b.jpg", (72, 40))]:
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(path, quality=95)
    (root / "notes.txt").write_text("not an image")
    return root


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_find_images_recurses_and_filters(images: Path, tmp_path: Path) -> None:
    found = find_images([images])
    assert [p.relative_to(images).as_posix() for p in found] == ["a.png", "sub/b.jpg"]
    # an explicit file is read whatever its suffix; duplicates are dropped
    assert find_images([images / "notes.txt", images, images / "a.png"])[0].name == "notes.txt"
    assert len(find_images([images / "notes.txt", images, images / "a.png"])) == 3
    with pytest.raises(FileNotFoundError, match="missing.png"):
        find_images([images / "missing.png"])


def test_grounding_json_equals_predictor_and_png_draws_boxes(
    runs: dict[str, Path], images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = main(
        [str(images), "--checkpoint", str(runs["fine"]), "--task", "grounding", "--text", "[a red circle] and [a square]",
         "--out", str(out), "--max-draw", "3", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = _read(out / "predictions.json")
    assert summary["task"] == "grounding" and summary["num_images"] == 2 and summary["skipped"] == []

    # the same batch through the predictor directly, with the referring-expression thresholds the demo uses
    predictor = GroundingPredictor.from_run(runs["fine"])
    pils = [Image.open(images / "a.png").convert("RGB"), Image.open(images / "sub" / "b.jpg").convert("RGB")]
    prompt = Prompt("a red circle and a square", (0, 1), {0: (0, 12), 1: (17, 25)})
    expected = predictor.predict(pils, [prompt, prompt], config=PostprocessConfig.referring_expressions())

    for stem, pil, pred, rec in zip(["a", "b"], pils, expected, summary["predictions"]):
        per_image = _read(out / f"{stem}.json")
        assert per_image == rec
        assert rec["image"] == {"width": pil.width, "height": pil.height}
        assert rec["label_names"] == ["a red circle", "a square"]
        assert len(rec["boxes"]) == len(pred) > 0
        got = torch.tensor([b["box"] for b in rec["boxes"]])
        torch.testing.assert_close(got, pred.boxes, atol=6e-3, rtol=0)  # rounded to 2 decimals in the JSON
        torch.testing.assert_close(torch.tensor([b["score"] for b in rec["boxes"]]), pred.scores, atol=5e-5, rtol=0)
        assert [b["phrase"] for b in rec["boxes"]] == list(pred.phrases)
        assert [b["label"] for b in rec["boxes"]] == pred.labels.tolist()

        # the drawing is exactly draw_boxes of the three best boxes, and the best box's outline is coloured
        drawn = Image.open(out / f"{stem}.png").convert("RGB")
        k = -(-384 // max(pil.size))  # small images are drawn on a canvas upscaled to >= 384 pixels
        assert k > 1 and drawn.size == (pil.width * k, pil.height * k)
        top = rec["boxes"][:3]
        ref = draw_boxes(pil, [b["box"] for b in top], [b["label"] for b in top],
                         [f"{b['phrase']} {b['score']:.2f}" for b in top], min_side=384)  # fmt: skip
        assert np.array_equal(np.asarray(drawn), np.asarray(ref))
        x0, y0, x1, y1 = (int(round(v)) for v in top[0]["box"])
        x0, x1 = max(0, min(x0, pil.width - 1)), max(0, min(x1, pil.width - 1))
        y1 = max(0, min(y1, pil.height - 1))
        # bottom edge: the label strip is at the top, so this row shows the outline itself
        xm = (x0 + x1) // 2
        assert drawn.getpixel((xm * k, y1 * k + k - 1)) == COLORS[top[0]["label"]] != pil.getpixel((xm, y1))


def test_small_images_are_drawn_upscaled_with_whole_separate_labels() -> None:
    from fiber_train.predict_cli import drawing_scale

    assert [
        drawing_scale((64, 48)),
        drawing_scale((200, 100)),
        drawing_scale((384, 10)),
        drawing_scale((64, 64), 0),
    ] == [
        6,
        2,
        1,
        1,
    ]
    gray = (128, 128, 128)
    image = Image.new("RGB", (64, 48), gray)
    image.putpixel((10, 10), (1, 2, 3))
    texts = ["red circle 0.91", "red circle 0.88"]
    # two boxes with the same top-left corner near the right edge: today the labels overlap and run off the image
    drawn = draw_boxes(image, [[40, 20, 60, 40], [40, 20, 62, 44]], [0, 1], texts, width=1, min_side=384)
    assert drawn.size == (384, 288)
    assert drawn.getpixel((60, 60)) == (1, 2, 3) == drawn.getpixel((65, 65))  # nearest-neighbour upscaling
    white = np.asarray(drawn).min(axis=2) >= 230  # label text is the only (near) white
    rows = np.nonzero(white.any(axis=1))[0]
    bands = np.split(rows, np.nonzero(np.diff(rows) > 1)[0] + 1)
    assert len(bands) == 2  # two labels, on separate rows (today: drawn over each other)
    for band in bands:
        cols = np.nonzero(white[band].any(axis=0))[0]
        assert cols.max() < 383 and cols.max() - cols.min() > 60  # the whole text, moved left to fit
    # the best box's label sits right above its box
    assert bands[0].max() < 20 * 6 <= bands[1].min() or bands[1].max() < 20 * 6


def test_draw_boxes_changes_only_box_outlines_and_labels() -> None:
    gray = (128, 128, 128)
    image = Image.new("RGB", (200, 160), gray)
    drawn = draw_boxes(image, [[100, 80, 180, 140], [20.4, 100, 60, 150]], [0, 1], ["cat 0.90", ""], width=1)
    assert image.getpixel((140, 80)) == gray  # the input is not modified
    first, second = COLORS[0], COLORS[1]
    # outlines: the first (best) box has a 2-pixel line, the second a 1-pixel line at rounded coordinates
    for xy in [(140, 140), (140, 139), (100, 110), (101, 110), (180, 110), (179, 110)]:
        assert drawn.getpixel(xy) == first, xy
    for xy in [(20, 125), (60, 125), (40, 150), (40, 100)]:
        assert drawn.getpixel(xy) == second, xy
    assert drawn.getpixel((21, 125)) == gray and drawn.getpixel((40, 101)) == gray  # 1-pixel line
    # the label strip sits above the first box, starting at its left edge
    assert drawn.getpixel((100, 79)) == first == drawn.getpixel((100, 70))
    # box interiors and everything away from the boxes and the label strip are unchanged
    a = np.asarray(drawn).astype(int) - np.asarray(image).astype(int)
    changed = np.abs(a).sum(axis=2) > 0
    allowed = np.zeros_like(changed)
    allowed[60:141, 100:181] = True  # first box and its label strip (<= 20 px above it)
    allowed[100:151, 20:61] = True
    allowed[82:138, 102:178] = False  # inside the first box
    allowed[101:150, 21:60] = False
    assert changed[allowed].any() and not changed[~allowed].any()
    # a box on the top edge gets its label inside, and boxes are clipped to the image
    top = draw_boxes(image, [[-5, 0, 250, 50]], [2], ["dog"], width=1)
    assert top.getpixel((0, 25)) == COLORS[2] and top.getpixel((199, 25)) == COLORS[2]
    assert top.getpixel((2, 2)) == COLORS[2]  # the label strip, inside the box


def test_detection_batches_split_like_single_image_calls(
    runs: dict[str, Path], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with --pad-to the result of an image does not depend on its batch: batch size 1 == batch size 2
    calls: list[int] = []
    original = GroundingPredictor.predict

    def counting(self, images, texts, **kwargs):
        calls.append(len(images))
        return original(self, images, texts, **kwargs)

    monkeypatch.setattr(GroundingPredictor, "predict", counting)
    outs = []
    for bs in ("1", "2"):
        out = tmp_path / f"bs{bs}"
        args = [str(images / "a.png"), str(images / "sub"), "--checkpoint", str(runs["fine"] / "model"),
                "--task", "detection", "--text", "red circle, blue square", "--out", str(out),
                "--batch-size", bs, "--pad-to", "128x128", "--threshold", "0.01", "--no-progress"]  # fmt: skip
        assert main(args) == 0
        outs.append(_read(out / "predictions.json")["predictions"])
    assert calls == [1, 1, 2]  # one batched forward per --batch-size images
    assert [r["file"] for r in outs[0]] == [str(images / "a.png"), str(images / "sub" / "b.jpg")]
    for r1, r2 in zip(*outs):
        assert r1["label_names"] == ["red circle", "blue square"] and r1["query"] == ["red circle", "blue square"]
        assert r1["postprocess"]["pre_nms_thresh"] == 0.01
        assert len(r1["boxes"]) == len(r2["boxes"]) > 0
        for b1, b2 in zip(r1["boxes"], r2["boxes"]):
            assert b1["phrase"] == b2["phrase"] and abs(b1["score"] - b2["score"]) <= 2e-4
            assert max(abs(u - v) for u, v in zip(b1["box"], b2["box"])) <= 0.05


def test_scoring_equals_backend(runs: dict[str, Path], images: Path, tmp_path: Path) -> None:
    from fiber_train.demo import load_backends

    out = tmp_path / "scores"
    text = "a red circle\na blue square"
    assert main([str(images), "--checkpoint", str(runs["coarse"]), "--task", "scoring", "--text", text,
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    summary = _read(out / "predictions.json")
    backend = load_backends([runs["coarse"]]).backends["scoring"]
    for stem, rel in [("a", "a.png"), ("b", "sub/b.jpg")]:
        rec = _read(out / f"{stem}.json")
        assert not (out / f"{stem}.png").exists()
        ref = backend.run(Image.open(images / rel).convert("RGB"), text)
        assert rec["captions"] == ref["captions"] and rec["best"] == ref["best"]
        assert rec["file"] == str(images / rel)
    assert [r["output"] for r in summary["predictions"]] == ["a.json", "b.json"]


def test_errors_name_the_file_the_run_and_the_task(
    runs: dict[str, Path], images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = images / "notes.txt"
    base = ["--checkpoint", str(runs["fine"]), "--task", "detection", "--text", "circle", "--no-progress"]
    # an unreadable image named explicitly stops the run, naming the file
    assert main([str(bad), str(images / "a.png"), "--out", str(tmp_path / "o1"), *base]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad" in err
    # ... or is listed under "skipped"
    assert main([str(bad), str(images / "a.png"), "--out", str(tmp_path / "o2"), "--skip-bad", *base]) == 0
    summary = _read(tmp_path / "o2" / "predictions.json")
    assert [s["file"] for s in summary["skipped"]] == [str(bad)] and summary["num_images"] == 1
    assert (tmp_path / "o2" / "a.png").is_file() and not (tmp_path / "o2" / "notes.json").exists()

    # a checkpoint without the task's head
    code = main([str(images), "--out", str(tmp_path / "o3"), "--checkpoint", str(runs["coarse"]),
                 "--task", "grounding", "--text", "a circle"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and str(runs["coarse"]) in err and "'grounding'" in err and "fine" in err
    assert main([str(images), "--out", str(tmp_path / "o4"), "--checkpoint", str(runs["fine"]), "--task", "vqa",
                 "--text", "what?"]) == 2  # fmt: skip
    assert "'vqa' is not available" in capsys.readouterr().err

    # no images; empty text; an output that would overwrite an input
    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    assert main([str(empty), "--out", str(tmp_path / "o5"), *base]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main([str(images / "a.png"), "--out", str(tmp_path / "o6"), *base[:-3], "--text", "  "]) == 2
    assert "needs --text" in capsys.readouterr().err
    assert main([str(images / "a.png"), "--out", str(images), *base]) == 2
    assert "overwrite the input image" in capsys.readouterr().err
    # the predictor's own checks come back as a clear error naming the images
    assert main([str(images / "a.png"), "--out", str(tmp_path / "o7"), *base, "--pad-to", "32x32"]) == 2
    err = capsys.readouterr().err
    assert str(images / "a.png") in err and "pad_to=(32, 32) is smaller" in err
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o5").exists()
