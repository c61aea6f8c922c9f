"""`fiber-train coarse` end to end on a tiny synthetic world: run directory, exact resume, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fiber_train.cli import main

pytestmark = pytest.mark.integration

TINY = [
    "data.synthetic_train=48",
    "data.synthetic_val=8",
    "data.synthetic_test=16",
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=4",
    "trainer.ckpt_every=2",
    "trainer.keep_checkpoints=5",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.deterministic=true",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("world") / "synthetic"


def _run(out: Path, world: Path, name: str, *extra: str) -> int:
    return main(["coarse", "--out", str(out), "--run-name", name, "--set", f"data.root={world}", *TINY, *extra])


def test_default_run_writes_a_complete_run_directory(tmp_path: Path, world: Path, capsys) -> None:
    assert _run(tmp_path, world, "a") == 0
    run = tmp_path / "a"
    for name in (
        "config.yaml",
        "metrics.csv",
        "eval.json",
        "loss_curve.png",
        "model/model.safetensors",
        "model/config.json",
    ):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"loss", "itc/loss", "itm/loss", "mlm/loss", "lr", "samples_per_s", "step_time_s"} <= set(rows[0])
    gates = [k for k in rows[0] if k.startswith("gate/")]
    assert "gate/img.s3.b1.i2t" in gates and "gate/txt.l3.t2i" in gates
    assert len(gates) == 6  # fiber-tiny fuses 3 blocks/layers, one gate per direction
    assert float(rows[0][gates[0]]) == 0.0  # gates start at 0 (the first step runs at warm-up lr 0)
    assert any(float(rows[-1][g]) != 0.0 for g in gates)  # and move once training starts
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "eval.json").read_text())
    # `tensorboard --logdir` shows the losses and the evaluation at its step (read with TensorBoard's reader)
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("itc/loss")] == [1, 2, 3, 4]
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("eval/t2i/R@1")] == [(4, round(metrics["t2i/R@1"], 3))]
    assert float(rows[-1]["eval/i2t/R@5"]) == pytest.approx(metrics["i2t/R@5"])  # and in metrics.csv
    assert (
        "resumed from" not in (run / "run.log").read_text() and "coarse: 4 steps into" in (run / "run.log").read_text()
    )
    assert metrics["num_images"] == 16 and metrics["num_texts"] == 48
    assert 0.0 <= metrics["t2i/R@1"] <= metrics["t2i/R@5"] <= metrics["t2i/R@10"] <= 100.0
    out = capsys.readouterr().out
    assert "text->image  R@1" in out and "chance R@1 = 6.2%" in out
    # the exported model re-scores to the same numbers
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["t2i/R@1"] == pytest.approx(metrics["t2i/R@1"])
    assert again["i2t/R@5"] == pytest.approx(metrics["i2t/R@5"])


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path: Path, world: Path) -> None:
    assert _run(tmp_path, world, "full") == 0
    full = tmp_path / "full"
    # simulate a crash after the step-2 checkpoint: drop everything written after it
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000004")
    shutil.rmtree(crashed / "model")
    assert main(["coarse", "--resume", str(crashed), "--set", "trainer.progress=false"]) == 0
    a = load_file(str(full / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(crashed / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and it really trained: weights moved away from the step-2 state
    mid = load_file(str(full / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)


def test_missing_data_folder_names_the_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "mydata").mkdir()
    rc = main(["coarse", "--data", str(tmp_path / "mydata"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "captions_train.json not found" in err and "fiber-data synth --out DIR" in err


def test_unknown_config_key_is_reported(tmp_path: Path, capsys) -> None:
    rc = main(["coarse", "--out", str(tmp_path), "--set", "trainer.max_stepz=3"])
    assert rc == 2
    assert "unknown config key 'trainer.max_stepz'" in capsys.readouterr().err


def test_print_config_shows_resolved_values(capsys) -> None:
    assert main(["coarse", "--print-config", "--set", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "backbone: fiber-tiny" in out


def test_bf16_mixed_precision_trains_and_evaluates(tmp_path: Path, world: Path) -> None:
    assert _run(tmp_path, world, "bf16", "trainer.precision=bf16-mixed", "trainer.max_steps=2") == 0
    metrics = json.loads((tmp_path / "bf16" / "eval.json").read_text())
    assert metrics["num_texts"] == 48 and 0.0 <= metrics["t2i/R@1"] <= 100.0
