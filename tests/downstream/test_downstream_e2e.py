"""`fiber-train finetune {retrieval,vqa,nlvr2,caption}` end to end on a tiny synthetic world."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fiber_data import CoarseTrainTransform, ImageTransform
from fiber_eval import load_vqa_annotations, vqa_accuracy
from fiber_train.cli import main
from fiber_train.config import load_config
from fiber_train.tasks import TASKS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "data.synthetic_train=32",
    "data.synthetic_val=8",
    "data.synthetic_test=8",
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=2",
    "trainer.log_every=1",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dsworld") / "synthetic"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dsruns")


def finetune(task: str, runs: Path, world: Path, name: str, *extra: str) -> Path:
    rc = main(["finetune", task, "--out", str(runs), "--run-name", name, "--set", f"data.root={world}", *TINY, *extra])
    assert rc == 0
    return runs / name


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def retrieval_run(runs: Path, world: Path) -> Path:
    return finetune(
        "retrieval", runs, world, "ret", "retrieval.objective=itm", "retrieval.eval_itm=true", "retrieval.rerank_k=2"
    )


def test_retrieval_itm_run_reranks_only_top_k(retrieval_run: Path) -> None:
    metrics = json.loads((retrieval_run / "eval.json").read_text())
    n_img, n_txt = int(metrics["num_images"]), int(metrics["num_texts"])
    assert (n_img, n_txt) == (8, 24)
    assert 0 < metrics["itm/num_scored_pairs"] <= 2 * n_img + 2 * n_txt < n_img * n_txt
    assert 0.0 <= metrics["itm/t2i/R@1"] <= metrics["itm/t2i/R@5"] <= 100.0
    assert {"itc/i2t/R@1", "itc/t2i/R@10"} <= metrics.keys()
    assert {"itm/loss", "itm/acc"} <= set(rows(retrieval_run)[0])


def test_vqa_run_from_pretrained_export_and_rescore(
    runs: Path, world: Path, retrieval_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = finetune("vqa", runs, world, "vqa", "vqa.answer_min_count=1", f"model.pretrained={retrieval_run / 'model'}")
    out = capsys.readouterr().err  # logged
    assert "[vqa] initialised" in out and "vqa_classifier.0 (2)" in out
    info = json.loads((run / "model" / "config.json").read_text())["info"]
    fresh = info["init"]["fresh"]
    assert fresh and all(k.startswith("vqa_classifier.") for k in fresh)
    assert {"vqa/loss", "vqa/score"} <= set(rows(run)[0])
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["vqa/num_questions"] == 24  # 8 test images x 3 questions, unanswerable ones included
    assert 0.0 <= metrics["vqa/accuracy"] <= 100.0
    answers = json.loads((run / "model" / "config.json").read_text())["head"]["answers"]
    assert "yes" in answers or "no" in answers
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "fresh: none" in captured.err  # the finished run re-loads completely (logged)
    again = json.loads(printed[printed.index("{\n") :])
    assert again["vqa/accuracy"] == pytest.approx(metrics["vqa/accuracy"])
    assert again["vqa/score"] == pytest.approx(metrics["vqa/score"])


def test_vqa_predictions_are_official_format_and_scored_by_fiber_eval(world: Path, tmp_path: Path) -> None:
    spec = TASKS["vqa"]
    cfg = load_config(spec.config, spec.default_recipe, [f"data.root={world}", *TINY, "vqa.answer_min_count=1"])
    task = spec.task(cfg)
    task.prepare_data()
    model = task.build_model().eval()
    task.run_dir = tmp_path
    with torch.no_grad():
        metrics = task.evaluate(model, SimpleNamespace(device=torch.device("cpu")))
    records = json.loads((tmp_path / "vqa_test_predictions.json").read_text())
    assert len(records) == 24 and set(records[0]) == {"question_id", "answer"}
    gts = {a.question_id: a.answers for a in load_vqa_annotations(world / "annotations" / "vqa_annotations_test.json")}
    expected = 100.0 * sum(vqa_accuracy(r["answer"], gts[r["question_id"]]) for r in records) / len(records)
    assert metrics["vqa/accuracy"] == pytest.approx(expected)
    # the tiny recipe trains on the evaluation transform; augment=true switches to RRC + flip + RandAugment
    assert isinstance(task.train_dataset().transform, ImageTransform)
    augmented = spec.task(load_config(spec.config, spec.default_recipe, [f"data.root={world}", "vqa.augment=true"]))
    assert isinstance(augmented.train_dataset().transform, CoarseTrainTransform)


def test_nlvr2_run_reports_each_split(runs: Path, world: Path) -> None:
    run = finetune("nlvr2", runs, world, "nlvr2")
    metrics = json.loads((run / "eval.json").read_text())
    for split in ("val", "test"):
        lines = (world / "nlvr2" / f"{split}.json").read_text().splitlines()
        assert metrics[f"nlvr2/{split}/num_statements"] == len(lines)
        assert 0.0 <= metrics[f"nlvr2/{split}/accuracy"] <= 100.0
    assert {"nlvr2/loss", "nlvr2/acc"} <= set(rows(run)[0])


def test_caption_cider_optimisation_run(runs: Path, world: Path, retrieval_run: Path) -> None:
    df_cache = runs / "cider_df.json.gz"
    run = finetune(
        "caption",
        runs,
        world,
        "cap",
        "caption.objective=cider",
        "caption.num_samples=2",
        "caption.max_decode_len=8",
        "caption.beam_size=2",
        "caption.toolkit_metrics=false",
        f"caption.cider_df={df_cache}",
        "eval.max_samples=4",
        f"model.pretrained={retrieval_run / 'model'}",
    )
    first = rows(run)[0]
    assert {"caption/mle", "caption/rl", "caption/reward", "caption/baseline"} <= set(first)
    assert float(first["loss"]) == pytest.approx(
        0.3 * float(first["caption/mle"]) + 0.7 * float(first["caption/rl"]), rel=1e-4, abs=1e-5
    )
    assert df_cache.is_file()
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["caption/num_images"] == 4 and metrics["caption/CIDEr"] >= 0.0
    info = json.loads((run / "model" / "config.json").read_text())["info"]
    assert any(k.startswith("cross_modal_att_layers.") for k in info["init"]["fresh"])


def test_missing_data_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["finetune", "nlvr2", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "nlvr2/train.json not found" in err and "fiber-data synth" in err
