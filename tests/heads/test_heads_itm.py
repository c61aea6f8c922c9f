"""MatchingHead, the hard-negative sampler and the 3B ITM batch layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fiber_heads import ContrastiveHead, MatchingHead, build_itm_batch_indices, sample_hard_negatives


def test_sampler_never_picks_the_positive() -> None:
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 9) * 3
    # Make the positive by far the most likely column: it must still never be drawn.
    sim[torch.arange(5), torch.arange(5)] += 20.0
    for _ in range(200):
        text_neg, image_neg = sample_hard_negatives(sim, sim.flip(1), generator=gen)
        assert text_neg.shape == image_neg.shape == (5,)
        assert not (text_neg == torch.arange(5)).any()
        assert not (image_neg == torch.arange(5)).any()


def test_sampler_follows_softmax_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    row = torch.tensor([0.0, 3.0, 1.0, 0.0, -2.0])  # positive is column 0
    sim = row.repeat(4000, 1)
    positives = torch.zeros(4000, dtype=torch.long)
    text_neg, _ = sample_hard_negatives(sim, sim, positives=positives, generator=gen)
    freq = torch.bincount(text_neg, minlength=5).double() / 4000
    expected = torch.softmax(row.double(), 0)
    expected[0] = 0
    expected /= expected.sum()
    assert freq[0] == 0
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)


def test_sampler_respects_num_valid_and_custom_positives() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.zeros(3, 7)
    sim[:, 5:] = 50.0  # unfilled (noise) columns with huge logits must never be drawn
    positives = torch.tensor([2, 0, 1])
    for _ in range(100):
        t, i = sample_hard_negatives(sim, sim, num_valid=4, positives=positives, generator=gen)
        assert (t < 4).all() and (i < 4).all()
        assert not (t == positives).any() and not (i == positives).any()
    with pytest.raises(ValueError, match="num_valid"):
        sample_hard_negatives(sim, sim, num_valid=8)
    with pytest.raises(ValueError, match="one shape"):
        sample_hard_negatives(sim, sim[:, :5])


def test_sampler_is_gradient_free() -> None:
    sim = torch.randn(3, 6, requires_grad=True)
    t, i = sample_hard_negatives(sim, sim * 2)
    assert not t.requires_grad and t.dtype == torch.long


def test_build_itm_batch_indices_layout() -> None:
    idx = build_itm_batch_indices(text_neg=torch.tensor([4, 0, 1]), image_neg=torch.tensor([2, 5, 0]))
    assert idx.batch_size == 3
    assert idx.image_columns.tolist() == [0, 1, 2, 0, 1, 2, 2, 5, 0]
    assert idx.text_columns.tolist() == [0, 1, 2, 4, 0, 1, 0, 1, 2]
    assert idx.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert idx.image_is_local.tolist() == [True] * 7 + [False, True]
    assert idx.text_is_local.tolist() == [True] * 3 + [False] + [True] * 5
    with pytest.raises(ValueError, match="text_neg"):
        build_itm_batch_indices(torch.tensor([1, 2]), torch.tensor([1]))


def test_matching_head_loss_and_score() -> None:
    head = MatchingHead(hidden_dim=16)
    assert set(head.state_dict()) == {"fc.weight", "fc.bias"}
    assert head.fc.weight.shape == (2, 32)
    cls = torch.randn(6, 32)
    labels = torch.tensor([1, 1, 0, 0, 0, 1])
    out = head(cls, labels)
    logits = cls.double() @ head.fc.weight.double().t() + head.fc.bias.double()
    manual = -(logits.log_softmax(-1)[torch.arange(6), labels]).mean()
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert out.logits["itm"].shape == (6, 2)
    assert out.logs["itm/acc"].item() == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    torch.testing.assert_close(head.score(cls).double(), cls.double() @ head.fc.weight[1].double() + head.fc.bias[1])
    assert head(cls).loss is None
    with pytest.raises(ValueError, match=r"cls must be \[B, 32\]"):
        head(torch.randn(2, 16))


def test_pretraining_itm_step_maps_queue_columns_to_dataset_indices() -> None:
    """ITC -> hard negatives -> 3B layout: queue columns resolve to the dataset indices recorded in the queue."""
    itc = ContrastiveHead(8, 8, 8, queue_size=6).train()
    itc(
        F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1), index=torch.tensor([40, 41, 42])
    )
    out = itc(
        F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1), index=torch.tensor([7, 8, 9])
    )
    assert out.column_index.tolist() == [7, 8, 9, 40, 41, 42]
    gen = torch.Generator().manual_seed(3)
    text_neg, image_neg = sample_hard_negatives(
        out.logits["i2t"], out.logits["t2i"], num_valid=out.num_valid, positives=out.targets, generator=gen
    )
    rows = build_itm_batch_indices(text_neg, image_neg)
    dataset_images = out.column_index[rows.image_columns]
    assert dataset_images[:6].tolist() == [7, 8, 9, 7, 8, 9]
    assert set(dataset_images[6:].tolist()) <= {7, 8, 9, 40, 41, 42}
    # A negative drawn for row j is never its own positive column.
    assert not (rows.image_columns[6:] == torch.arange(3)).any()
    itm = MatchingHead(4)
    res = itm(torch.randn(9, 8), rows.labels)
    assert res.loss.ndim == 0 and torch.isfinite(res.loss)
