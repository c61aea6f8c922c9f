"""`fiber-train fine` end to end on a tiny synthetic world: run directory, printed AP, re-evaluation, export."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fiber_models import ModelFormatError
from fiber_train.checkpoint import CheckpointError, load_weights
from fiber_train.cli import main
from fiber_train.config import load_config
from fiber_train.predictor import GroundingPredictor
from fiber_train.tasks.fine import FineConfig, FinePretrainTask
from fiber_train.tasks.grounding_common import GroundingModel, load_grounding_model

pytestmark = pytest.mark.integration


def test_run_directory_metrics_and_printed_ap(fine_run: tuple[Path, str]) -> None:
    run, stdout = fine_run
    for name in (
        "config.yaml",
        "metrics.csv",
        "eval.json",
        "checkpoints/step_00000003/model.safetensors",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/config.json",
    ):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv", newline="") as fh:
        logged = list(csv.DictReader(fh))
    # the tiny recipe evaluates the untrained model first (eval.start_baseline): its AP is the step-0 row
    start = [r for r in logged if int(r["step"]) == 0]
    assert len(start) == 1 and not start[0]["loss"] and 0.0 <= float(start[0]["eval/bbox/AP"]) <= 100.0
    rows = [r for r in logged if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        parts = (
            float(r["grounding/loss_token"]) + float(r["grounding/loss_reg"]) + float(r["grounding/loss_centerness"])
        )
        assert float(r["loss"]) == pytest.approx(parts, rel=1e-4)
        assert float(r["grounding/num_pos"]) > 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["num_images"] == 6 and metrics["num_classes"] == 40
    assert 0.0 <= metrics["bbox/AP"] <= metrics["bbox/AP50"] <= 100.0
    assert f"COCO box AP on 6 test images (40 class-name prompt): AP {metrics['bbox/AP']:.1f}" in stdout
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["model_type"] == "grounding" and meta["info"]["task"] == "fine" and meta["head"]["num_convs"] == 1
    assert meta["preprocessing"]["test_size"] == 64 and meta["preprocessing"]["resize"] == "shorter_side"


def test_evaluate_command_reproduces_the_run_ap(fine_run: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    run, _ = fine_run
    before = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 0
    text = capsys.readouterr().out
    again = json.loads(text[text.index("{") :])
    assert again["bbox/AP"] == pytest.approx(before["bbox/AP"])
    assert again["bbox/AP50"] == pytest.approx(before["bbox/AP50"])


def test_exported_model_equals_the_final_checkpoint_in_the_predictor(fine_run: tuple[Path, str]) -> None:
    run, _ = fine_run
    cfg = load_config(FineConfig, run / "config.yaml")
    task = FinePretrainTask(cfg)
    model = task.build_model()
    load_weights(model, run / "checkpoints" / "step_00000003" / "model.safetensors")
    direct = GroundingPredictor(model, task.tokenizer, test_size=64, max_text_len=cfg.data.max_text_len)
    loaded = GroundingPredictor.from_run(run)
    assert loaded.max_text_len == cfg.data.max_text_len and loaded.transform.min_sizes == (64,)
    images = sorted((Path(cfg.data.root) / "images" / "test").glob("*.png"))[:2]
    names = ["red circle", "blue square", "green triangle"]
    for a, b in zip(direct.detect(images, names), loaded.detect(images, names)):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.scores, b.scores)
    # the state dicts are identical, not just the predictions
    sd_a, sd_b = model.state_dict(), loaded.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_checkpoint_without_grounding_head_is_refused(fine_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = fine_run
    no_head = tmp_path / "no_head"
    shutil.copytree(run / "model", no_head)
    state = load_file(str(no_head / "model.safetensors"))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("head.dyhead_tower.")}, str(no_head / "model.safetensors")
    )
    with pytest.raises(ModelFormatError, match=r"missing \(20\): head\.dyhead_tower\."):
        GroundingPredictor.from_run(no_head)
    with pytest.raises(CheckpointError, match=r"missing \(20\): head\.dyhead_tower\."):
        load_grounding_model(no_head)
    coarse = tmp_path / "coarse"
    shutil.copytree(run / "model", coarse)
    config = json.loads((coarse / "config.json").read_text())
    config.update(model_type="coarse", info={"task": "coarse"})
    (coarse / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"task 'coarse'.*no grounding head"):
        load_grounding_model(coarse)
    with pytest.raises(ModelFormatError, match=r"holds a 'coarse' model, not 'grounding'"):
        GroundingPredictor.from_run(coarse)
    with pytest.raises(FileNotFoundError, match="not a saved FIBER model"):
        GroundingPredictor.from_run(tmp_path)


def test_pretrained_fine_export_initialises_a_new_run(fine_run: tuple[Path, str]) -> None:
    run, _ = fine_run
    cfg = load_config(FineConfig, run / "config.yaml", [f"model.pretrained={run / 'model'}"])
    model = FinePretrainTask(cfg).build_model()
    assert isinstance(model, GroundingModel) and model.training
    ref, _ = load_grounding_model(run)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
