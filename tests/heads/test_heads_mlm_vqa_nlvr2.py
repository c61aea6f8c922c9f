"""MaskedLMHead, VQAHead and NLVR2Head: losses against independent formulas, official key layout."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fiber_heads import IGNORE_INDEX, MaskedLMHead, NLVR2Head, VQAHead


def test_mlm_structure_matches_official_layout() -> None:
    head = MaskedLMHead(hidden_dim=16, vocab_size=50)
    assert set(head.state_dict()) == {
        "transform.dense.weight",
        "transform.dense.bias",
        "transform.LayerNorm.weight",
        "transform.LayerNorm.bias",
        "decoder.weight",
        "bias",
    }
    assert head.decoder.bias is None and head.decoder.weight.shape == (50, 16)
    assert head.transform.LayerNorm.eps == 1e-12
    assert (head.bias == 0).all()


def test_mlm_loss_matches_manual_cross_entropy() -> None:
    head = MaskedLMHead(hidden_dim=16, vocab_size=50)
    with torch.no_grad():
        head.bias.normal_()
    feats = torch.randn(2, 6, 16, requires_grad=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 1], labels[0, 4], labels[1, 2] = 3, 17, 49
    out = head(feats, labels)
    assert out.logits["mlm"].shape == (2, 6, 50)
    # Independent route: transform by hand (erf GELU, LayerNorm eps 1e-12), logits at masked positions only.
    t = head.transform
    x = feats.detach().double()
    h = x @ t.dense.weight.double().t() + t.dense.bias.double()
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-12)
    h = h * t.LayerNorm.weight.double() + t.LayerNorm.bias.double()
    logits = h @ head.decoder.weight.double().t() + head.bias.double()
    positions = [(0, 1), (0, 4), (1, 2)]
    ces = [-(logits[b, i].log_softmax(-1)[labels[b, i]]).item() for b, i in positions]
    assert out.loss.item() == pytest.approx(float(np.mean(ces)), rel=1e-5)
    hits = [logits[b, i].argmax().item() == labels[b, i].item() for b, i in positions]
    assert out.logs["mlm/acc"].item() == pytest.approx(float(np.mean(hits)))
    out.loss.backward()
    assert feats.grad is not None
    assert feats.grad[0, 0].abs().sum() == 0  # unmasked positions get no gradient
    assert feats.grad[0, 1].abs().sum() > 0


def test_mlm_accuracy_counts_only_masked_tokens() -> None:
    head = MaskedLMHead(hidden_dim=8, vocab_size=10)
    feats = torch.randn(1, 4, 8)
    pred = head(feats).logits["mlm"].argmax(-1)
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 0] = pred[0, 0]  # correct
    labels[0, 2] = (pred[0, 2] + 1) % 10  # wrong
    assert head(feats, labels).logs["mlm/acc"].item() == pytest.approx(0.5)


def test_mlm_without_masked_tokens_is_zero_not_nan() -> None:
    head = MaskedLMHead(hidden_dim=8, vocab_size=10)
    feats = torch.randn(2, 3, 8, requires_grad=True)
    out = head(feats, torch.full((2, 3), IGNORE_INDEX))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert feats.grad is not None
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() == 0
    assert out.logs["mlm/acc"].item() == 0.0
    with pytest.raises(ValueError, match="labels shape"):
        head(feats, torch.zeros(2, 4, dtype=torch.long))


def test_vqa_layout_and_scaled_bce() -> None:
    head = VQAHead(hidden_dim=8, num_answers=12)
    assert set(head.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert head[0].weight.shape == (16, 16) and head[3].weight.shape == (12, 16)
    assert head[1].eps == 1e-5
    cls = torch.randn(3, 16)
    targets = torch.zeros(3, 12)
    targets[0, 2], targets[0, 5], targets[1, 7], targets[2, 0] = 1.0, 0.3, 0.6, 0.9
    out = head(cls, targets)
    x = out.logits["vqa"].detach().double().numpy()
    t = targets.double().numpy()
    sig = 1 / (1 + np.exp(-x))
    # Sum of per-answer BCE, averaged over questions == mean over B x A times A.
    manual = -(t * np.log(sig) + (1 - t) * np.log(1 - sig)).sum(axis=1).mean()
    assert out.loss.item() == pytest.approx(manual, rel=1e-5)
    pred = head.predict(cls)
    assert pred.tolist() == x.argmax(1).tolist()
    assert out.logs["vqa/score"].item() == pytest.approx(t[np.arange(3), x.argmax(1)].mean())
    with pytest.raises(ValueError, match="targets"):
        head(cls, targets[:, :5])


def test_nlvr2_pair_shapes_and_loss() -> None:
    head = NLVR2Head(hidden_dim=8)
    assert head[0].weight.shape == (16, 32) and head[3].weight.shape == (2, 16)
    cls_0, cls_1 = torch.randn(4, 16), torch.randn(4, 16)
    pair = NLVR2Head.pair(cls_0, cls_1)
    torch.testing.assert_close(pair[:, :16], cls_0)  # image 0 first
    labels = torch.tensor([1, 0, 0, 1])
    out = head(pair, labels)
    assert out.logits["nlvr2"].shape == (4, 2)
    manual = F.cross_entropy(head.logits(pair).double(), labels)
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # logits() is the same Linear -> LN -> GELU -> Linear chain as calling the layers one by one.
    norm = cast(torch.nn.LayerNorm, head[1])
    ref = head[3](F.gelu(F.layer_norm(head[0](pair), (16,), norm.weight, norm.bias, 1e-5)))
    torch.testing.assert_close(out.logits["nlvr2"], ref)
    assert out.logs["nlvr2/acc"].item() == pytest.approx((ref.argmax(-1) == labels).float().mean().item())
    assert head.predict(pair).tolist() == ref.argmax(-1).tolist()
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        head(cls_0)
