"""Proof that the tiny defaults of `fiber-train finetune refexp` and `fiber-train finetune detection` learn: on the
synthetic world, referring-expression accuracy and detection AP after the packaged default recipes are far above
the same model untrained (``trainer.max_steps=0``: the randomly initialised model, evaluated the same way).

The refexp default runs unchanged (300 steps); the detection default is cut from 900 to 300 steps to keep the
suite short (the README gives the full-default figures and the coarse-initialised ones). Both start from random
weights here, so what they prove is box localisation and objectness, not yet language: the REC accuracy is
checked against the accuracy of picking a random object, and detection AP against zero."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fiber_train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _eval(task: str, out: Path, name: str, world: Path, *extra: str) -> dict[str, float]:
    buf = io.StringIO()
    args = ["finetune", task, "--out", str(out), "--run-name", name, "--set", f"data.root={world}"]
    with contextlib.redirect_stdout(buf):
        code = main([*args, "trainer.progress=false", *extra])
    assert code == 0, buf.getvalue()
    return json.loads((out / name / "eval.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic world (what the recipes generate under data/synthetic), in a temporary folder."""
    return tmp_path_factory.mktemp("proof") / "synthetic"


def _random_object_accuracy(world: Path, count: int) -> float:
    """P@1 of a model that localises every object perfectly and picks one at random (100 / objects in the image)."""
    refexp = json.loads((world / "annotations" / "refexp_val.json").read_text())
    instances = json.loads((world / "annotations" / "instances_val.json").read_text())
    objects: dict[int, int] = {}
    for a in instances["annotations"]:
        objects[a["image_id"]] = objects.get(a["image_id"], 0) + 1
    return sum(100.0 / objects[im["original_id"]] for im in refexp["images"][:count]) / count


def test_refexp_tiny_default_learns(world: Path, tmp_path: Path) -> None:
    untrained = _eval("refexp", tmp_path, "untrained", world, "trainer.max_steps=0")
    trained = _eval("refexp", tmp_path, "default", world)
    assert trained["num_expressions"] == untrained["num_expressions"] == 300
    print({k: trained[k] for k in ("giou/all/P@1", "giou/all/P@5")}, untrained["giou/all/P@1"])
    assert untrained["giou/all/P@1"] < 5.0 and untrained["giou/all/P@5"] < 15.0
    # the objects found among the top boxes (P@5 > 3.5x the untrained bar), and the top box on one of the
    # objects about as often as chance. Spread of the default run measured for issue 19 (P@1 / P@5):
    # trainer.seed 1/2 on an AVX512-BF16 CPU: 45.7, 76.0 / 48.7, 98.7 (seed 0 not re-measured); under
    # ATEN_CPU_CAPABILITY=avx2, seeds 0/1: 47.7, 87.3 / 44.7, 83.0; seed 0 on an Intel AMX CPU: P@5 70.0.
    # The former bar P@5 > 80 failed on two of these five; the bars sit well inside the worst case.
    # 2026-12-04 on main after the HF-tokenizers switch: P@1 40.0, P@5 81.3 (another run, one thread: 41.3):
    # P@1 sits near 0.8x random-object accuracy (~39), so the P@1 bar is 0.6x it (still > 40x untrained)
    assert trained["giou/all/P@5"] > 35.0
    assert trained["giou/all/P@1"] > 0.6 * _random_object_accuracy(world, 300)


def test_detection_tiny_default_learns(world: Path, tmp_path: Path) -> None:
    untrained = _eval("detection", tmp_path, "untrained", world, "trainer.max_steps=0")
    trained = _eval("detection", tmp_path, "default", world, "trainer.max_steps=300")
    assert trained["num_images"] == untrained["num_images"] == 200
    print({k: trained[k] for k in ("bbox/AP", "bbox/AP50", "bbox/AR100")}, untrained["bbox/AP50"])
    assert untrained["bbox/AP50"] < 0.5 and untrained["bbox/AR100"] < 5.0
    assert trained["bbox/AR100"] > 30.0
    assert trained["bbox/AP50"] > 1.5
