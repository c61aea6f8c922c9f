"""scripts/fusion_diagnostics.py (issue 19): the scene comparison, the presence check, the linear probe, and the
script end to end on a 4-step coarse run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fiber_train.cli import main as train_main
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]


diag = load_script(ROOT / "scripts" / "fusion_diagnostics.py", "fusion_diagnostics")
RED_CIRCLE = ("red", "circle", "small", "top left")
BLUE_SQUARE = ("blue", "square", "large", "center")


def test_scene_difference_names_what_differs() -> None:
    a = (RED_CIRCLE, BLUE_SQUARE)
    assert diag.scene_difference(a, a) == "same"
    assert diag.scene_difference(a, (RED_CIRCLE,)) == "count"
    assert diag.scene_difference(a, (("green", "circle", "small", "top left"), BLUE_SQUARE)) == "colour"
    assert diag.scene_difference(a, (RED_CIRCLE, ("blue", "square", "small", "right"))) == "size+position"
    swapped = (("blue", "circle", "small", "top left"), ("red", "square", "large", "center"))
    assert diag.scene_difference(a, swapped) == "multi"  # the colours swapped between the two objects


def test_presence_check_ignores_binding_size_and_position() -> None:
    a = (RED_CIRCLE, BLUE_SQUARE)
    swapped = (("blue", "circle", "small", "top left"), ("red", "square", "large", "center"))
    moved = (("red", "circle", "large", "bottom"), BLUE_SQUARE)
    assert not diag.presence_check_rejects(a, swapped)  # same colours and shapes, bound differently
    assert not diag.presence_check_rejects(a, moved)
    assert diag.presence_check_rejects(a, (RED_CIRCLE, ("blue", "cross", "large", "center")))
    assert diag.presence_check_rejects(a, (RED_CIRCLE,))


def test_linear_probe_reads_a_planted_signal_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    noise = torch.randn(400, 16, generator=g)
    signal = noise.clone()
    signal[:, 3] = 0.01 * y + 0.001 * noise[:, 3]  # the label in a direction of tiny variance
    assert diag.linear_probe(signal, y, num_classes=4) > 0.9
    assert diag.linear_probe(noise, y, num_classes=4) < 0.45  # chance is about 0.25


def test_hard_negative_report_counts_the_argmax_pairs() -> None:
    scenes = [(RED_CIRCLE,), (BLUE_SQUARE,), (RED_CIRCLE, BLUE_SQUARE)]
    text_to_image = torch.tensor([0, 1, 2]).numpy()
    # image 0 is closest to caption 2 (a count difference), caption 0 closest to image 1 (colour+shape+...)
    scores = torch.tensor([[5.0, 1.0, 4.0], [3.0, 5.0, 3.0], [2.0, 1.0, 5.0]])
    report = diag.hard_negative_report(scores, text_to_image, scenes, 1)
    assert report["caption_negatives"] == {"count": 1}
    assert report["image_negatives"] == {"colour+shape+size+position": 1}
    assert report["presence_check_rejects"] == {"captions": 1, "images": 1}
    assert report["presence_check_itm_acc"] == pytest.approx(1.0)


@pytest.mark.integration
def test_script_runs_on_a_coarse_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = tmp_path / "synthetic"
    tiny = ["data.synthetic_train=48", "data.synthetic_val=8", "data.synthetic_test=24", "data.batch_size=8"]
    tiny += ["model.hidden_dim=32", "model.itc_dim=32", "trainer.max_steps=4", "trainer.progress=false"]
    assert train_main(["coarse", "--out", str(tmp_path), "--run-name", "r", "--set", f"data.root={world}", *tiny]) == 0
    out = tmp_path / "diag.json"
    assert diag.main([str(tmp_path / "r"), "--data-root", str(world), "--queries", "10", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    hn, cr = report["hard_negatives"], report["colour_readout"]
    assert hn["num_queries"] == 10
    assert sum(hn["caption_negatives"].values()) == sum(hn["image_negatives"].values()) == 10
    rejected = hn["presence_check_rejects"]
    assert hn["presence_check_itm_acc"] == pytest.approx((10 + rejected["captions"] + rejected["images"]) / 30)
    assert cr["num_captions"] > 0 and 0.0 < cr["top5_variance_share"] <= 1.0
    for name in ("own", "shuffled", "unfused"):
        assert 0.0 <= cr[f"mlm_acc/{name}"] <= 1.0 and 0.0 <= cr[f"probe/{name}"] <= 1.0
    assert "presence check" in capsys.readouterr().out
