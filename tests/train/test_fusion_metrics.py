"""`fusion_metrics`: the held-out proof of the coarse model's fused path, checked against outcomes known by
construction (a head forced to one answer, a re-ranking that cannot change the order)."""

from __future__ import annotations

import pytest
import torch

from fiber_train.config import CoarseConfig, load_config
from fiber_train.tasks.coarse import (
    CoarseModel,
    CoarsePretrainTask,
    fusion_metrics,
    hardest_negatives,
    retrieval_metrics,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> CoarsePretrainTask:
    root = tmp_path_factory.mktemp("fusion") / "synthetic"
    cfg = load_config(
        CoarseConfig,
        "coarse/tiny",
        [
            f"data.root={root}",
            "data.synthetic_train=32",
            "data.synthetic_val=4",
            "data.synthetic_test=12",
            "model.hidden_dim=32",
            "model.itc_dim=32",
            "trainer.progress=false",
        ],
    )
    t = CoarsePretrainTask(cfg)
    t.prepare_data()
    return t


def _metrics(task: CoarsePretrainTask, model: CoarseModel, **kw: int) -> dict[str, float]:
    return fusion_metrics(model, task.config.data, task.tokenizer, task.image_transform(), device="cpu", **kw)


def test_itm_accuracy_counts_one_positive_and_two_negatives(task: CoarsePretrainTask) -> None:
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        model.itm_score.fc.weight.zero_()
        model.itm_score.fc.bias.copy_(torch.tensor([5.0, -5.0]))  # always "no match"
    m = _metrics(model=model, task=task)
    assert m["fusion/num_queries"] == 12
    assert m["itm/acc"] == pytest.approx(2 / 3) == pytest.approx(m["itm/prior"])
    with torch.no_grad():
        model.itm_score.fc.bias.copy_(torch.tensor([-5.0, 5.0]))  # always "match"
    assert _metrics(model=model, task=task)["itm/acc"] == pytest.approx(1 / 3)


def test_rerank_of_one_candidate_is_itc_and_itc_r1_matches_retrieval(task: CoarsePretrainTask) -> None:
    torch.manual_seed(1)
    model = task.build_model().eval()
    m = _metrics(model=model, task=task, rerank_k=1)
    assert m["t2i_rerank/R@1"] == pytest.approx(m["t2i_itc/R@1"])
    # with one query caption per image and 3 captions each, ITC R@1 over the first captions is bounded by
    # the full retrieval's hits: it can exceed the all-caption R@1 by at most a factor of 3
    full = retrieval_metrics(model, task.config.data, task.tokenizer, task.image_transform(), device="cpu")
    assert 0.0 <= m["t2i_itc/R@1"] <= min(100.0, 3 * full["t2i/R@1"] + 1e-6)


def test_mlm_baseline_is_the_most_frequent_token_share(task: CoarsePretrainTask) -> None:
    torch.manual_seed(2)
    model = task.build_model().eval()
    m = _metrics(model=model, task=task)
    assert m["mlm/num_masked"] > 0
    assert 0.0 < m["mlm/unigram_acc"] < 1.0 and 0.0 <= m["mlm/acc"] <= 1.0
    # seeded masking: the same call gives the same figures
    again = _metrics(model=model, task=task)
    assert again["mlm/acc"] == m["mlm/acc"] and again["mlm/unigram_acc"] == m["mlm/unigram_acc"]


def test_hardest_negatives_skip_every_caption_of_the_same_image() -> None:
    # 3 images, captions 0-1 of image 0, 2 of image 1, 3 of image 2; queries: captions 0 and 2
    scores = torch.tensor(
        [
            [9.0, 8.0, 1.0, 2.0],  # image 0: its own captions 0 and 1 are the most similar, then caption 3
            [7.0, 0.0, 9.0, 3.0],  # image 1
            [6.0, 0.0, 8.5, 9.0],  # image 2
        ]
    )
    text_neg, image_neg = hardest_negatives(scores, torch.tensor([0, 0, 1, 2]), torch.tensor([0, 2]))
    assert text_neg.tolist() == [3, 0]  # image 1's best other caption is caption 0 (7.0), not its own 2
    assert image_neg.tolist() == [1, 2]  # caption 0 -> image 1 (7.0 > 6.0); caption 2 -> image 2 (8.5 > 1.0)
