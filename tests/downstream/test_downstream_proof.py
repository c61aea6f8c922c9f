"""Proof that the tiny defaults of `fiber-train finetune vqa | nlvr2 | caption | retrieval` learn (issue 19): on the
default synthetic world, each held-out figure beats its trivial baseline (reported by the run itself as
``baseline/<key>`` and logged beside the figure) by a wide margin.

Each test runs the packaged recipe once, unchanged except for fewer evaluation samples (VQA) or without the
slow ITM re-ranking (retrieval). Each docstring lists what was measured for issue 19 in exactly the configuration
the test runs (one CPU thread, an Intel CPU with AMX, ``trainer.seed`` 0/1/2; "avx2": the same under
``ATEN_CPU_CAPABILITY=avx2``), and every asserted bar sits well inside the worst case measured.

Not proven here because they do not hold yet (issue 19, README "The tiny downstream defaults against their
trivial baselines"): the NLVR2 default stays at the majority label (val 54.0 / test 59.0 vs 63.5 / 58.5) and the
caption default writes two captions for 64 images (CIDEr 33.2 vs 24.0 for the most common training caption);
the VQA margin below is the question prior (answering by question type alone gets 38.4), not the image.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fiber_train.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic world (what the recipes generate under data/synthetic), in a temporary folder."""
    return tmp_path_factory.mktemp("dsproof") / "synthetic"


def finetune(task: str, world: Path, out: Path, *extra: str) -> tuple[dict[str, float], str]:
    """Run ``fiber-train finetune <task>`` with its tiny default (plus ``extra``); ``(eval.json, run.log)``."""
    buf = io.StringIO()
    args = ["finetune", task, "--out", str(out), "--run-name", task, "--set", f"data.root={world}"]
    with contextlib.redirect_stdout(buf):
        code = main([*args, "trainer.progress=false", *extra])
    assert code == 0, buf.getvalue()
    return json.loads((out / task / "eval.json").read_text()), (out / task / "run.log").read_text()


def test_vqa_tiny_default_beats_the_most_frequent_answer(world: Path, tmp_path: Path) -> None:
    """VQA accuracy on the first 300 test questions after the default 300 steps, vs 13.7 for the most frequent
    training answer ("large"): seeds 0/1/2 37.1 / 36.9 / 38.1, avx2 seed 0 37.1 (worst 2.7x the baseline; bar 2x)."""
    m, log = finetune("vqa", world, tmp_path, "eval.max_samples=300")
    assert m["vqa/num_questions"] == 300
    assert "vqa held-out vqa/accuracy" in log and "vs baseline" in log
    assert 5.0 < m["baseline/vqa/accuracy"] < 20.0
    assert m["vqa/accuracy"] > 2.0 * m["baseline/vqa/accuracy"]


def test_retrieval_tiny_default_beats_its_starting_point(world: Path, tmp_path: Path) -> None:
    """ITC text->image / image->text R@1 on 200 test images x 600 captions after the default 300 steps, vs at
    step 0 (0.0-1.0, chance 0.5): seeds 0/1/2 61.7/65.0, 56.0/56.0, 69.3/69.5; avx2 seed 0 61.3/65.0 (worst 56.0;
    bar 35 points above the start). With the former ``data.max_text_len`` 24, which truncated a third of the
    captions, the same runs reached 45.0-54.5."""
    m, log = finetune("retrieval", world, tmp_path, "retrieval.eval_itm=false")
    assert (m["num_images"], m["num_texts"]) == (200, 600)
    assert "retrieval held-out itc/t2i/R@1" in log
    for key in ("itc/t2i/R@1", "itc/i2t/R@1"):
        assert m[f"baseline/{key}"] < 3.0  # the untrained dual encoder: chance is 0.5
        assert m[key] > m[f"baseline/{key}"] + 35.0
