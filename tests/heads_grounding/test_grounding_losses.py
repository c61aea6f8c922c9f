"""Focal / GIoU / centerness losses, target building, normalisation and the injected cross-rank mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fiber_heads.grounding import (
    AnchorGenerator,
    BoxCoder,
    GroundingTargets,
    atss_assign,
    build_anchor_targets,
    centerness_targets,
    giou_loss,
    grounding_losses,
    should_skip_batch,
    token_focal_loss,
)


def _hand_focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + torch.exp(torch.tensor(-logit)).item())
    if target == 1:
        return -alpha * (1 - p) ** gamma * torch.log(torch.tensor(p)).item()
    return -(1 - alpha) * p**gamma * torch.log(torch.tensor(1 - p)).item()


def test_token_focal_loss_hand_values_and_padding() -> None:
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 1.5, 40.0]]])  # [1, 2, 3]
    targets = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    expected = sum(_hand_focal(logits[0, a, j].item(), targets[0, a, j].item()) for a in range(2) for j in range(2))
    torch.testing.assert_close(token_focal_loss(logits, targets, mask), torch.tensor(expected))
    # padding tokens contribute nothing, not even non-finite values, and get no gradient
    logits2 = logits.clone()
    logits2[..., 2] = float("nan")
    logits2.requires_grad_(True)
    loss = token_focal_loss(logits2, targets, mask)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert logits2.grad is not None and torch.equal(logits2.grad[..., 2], torch.zeros(1, 2))


def _setup() -> tuple[torch.Tensor, list[int], GroundingTargets]:
    anchors, counts = AnchorGenerator(sizes=(16, 32, 64, 128, 256), strides=(4, 8, 16, 32, 64))(
        [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    )
    targets = GroundingTargets(
        boxes=[
            torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
            torch.tensor([[0.0, 0.0, 50.0, 63.0]]),
        ],
        positive_maps=[torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 0.0]])],
    )
    return anchors, counts, targets


def test_build_anchor_targets() -> None:
    anchors, counts, targets = _setup()
    at = build_anchor_targets(anchors, counts, targets, text_length=5)
    assert at.token_targets.shape == (2, anchors.shape[0], 5)
    for i in range(2):
        matched, _ = atss_assign(anchors, counts, targets.boxes[i])
        assert torch.equal(at.matched[i], matched)
        pos = matched >= 0
        assert pos.any()
        pm = (targets.positive_maps[i] != 0).float()
        pm = F.pad(pm, (0, 5 - pm.shape[1]))
        assert torch.equal(at.token_targets[i][pos], pm[matched[pos]])  # binarised rows of the matched box
        assert at.token_targets[i][~pos].sum() == 0
        assert torch.equal(at.box_targets[i][pos], targets.boxes[i][matched[pos]])
    compat = build_anchor_targets(anchors, counts, targets, text_length=5, unmatched_last_token=True)
    neg = ~compat.positive
    assert torch.equal(compat.token_targets[neg][:, -1], torch.ones(int(neg.sum())))
    assert compat.token_targets[neg][:, :-1].sum() == 0
    with pytest.raises(ValueError, match=r"positive_maps\[0\] has 4 columns"):
        build_anchor_targets(anchors, counts, targets, text_length=3)


def test_grounding_losses_against_manual_computation() -> None:
    anchors, counts, targets = _setup()
    b, a, length = 2, anchors.shape[0], 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, a, length, generator=g)
    reg = torch.randn(b, a, 4, generator=g) * 0.3
    ctr = torch.randn(b, a, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    losses = grounding_losses(logits, reg, ctr, anchors, counts, targets, mask)

    at = build_anchor_targets(anchors, counts, targets, length)
    pos = at.positive
    n_pos = pos.sum().float()
    assert losses.num_pos == n_pos
    valid = mask.bool()[:, None, :].expand_as(logits)
    from torchvision.ops import sigmoid_focal_loss

    focal = sigmoid_focal_loss(logits, at.token_targets, alpha=0.25, gamma=2.0, reduction="none")
    torch.testing.assert_close(losses.token, focal[valid].sum() / n_pos)
    coder = BoxCoder()
    pa = anchors.expand(b, -1, -1)[pos]
    tgt = coder.decode(coder.encode(at.box_targets[pos], pa), pa)
    w = centerness_targets(pa, tgt)
    torch.testing.assert_close(losses.reg, 2.0 * giou_loss(coder.decode(reg[pos], pa), tgt, w) / w.sum())
    bce = F.binary_cross_entropy_with_logits(ctr[pos], w, reduction="sum") / n_pos
    torch.testing.assert_close(losses.centerness, bce)
    torch.testing.assert_close(losses.total, losses.token + losses.reg + losses.centerness)


def test_cross_rank_normalisation_uses_injected_reduce() -> None:
    anchors, counts, targets = _setup()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, anchors.shape[0], 5, generator=g)
    reg = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.3
    ctr = torch.randn(2, anchors.shape[0], generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    local = grounding_losses(logits, reg, ctr, anchors, counts, targets, mask)
    calls: list[torch.Tensor] = []

    def fake_mean(x: torch.Tensor) -> torch.Tensor:
        # pretend a second rank reported three times our value: mean = 2x
        calls.append(x)
        return (x + 3 * x) / 2

    dist = grounding_losses(logits, reg, ctr, anchors, counts, targets, mask, reduce_mean=fake_mean)
    assert len(calls) == 2
    torch.testing.assert_close(dist.token, local.token / 2)
    torch.testing.assert_close(dist.reg, local.reg / 2)
    torch.testing.assert_close(dist.centerness, local.centerness / 2)


def test_images_without_boxes() -> None:
    anchors, counts, _ = _setup()
    targets = GroundingTargets(boxes=[torch.zeros(0, 4)], positive_maps=[torch.zeros(0, 4)])
    logits = torch.randn(1, anchors.shape[0], 4, requires_grad=True)
    reg = torch.randn(1, anchors.shape[0], 4, requires_grad=True)
    ctr = torch.randn(1, anchors.shape[0], requires_grad=True)
    calls: list[torch.Tensor] = []
    losses = grounding_losses(
        logits, reg, ctr, anchors, counts, targets, torch.ones(1, 4), reduce_mean=lambda x: calls.append(x) or x
    )
    assert len(calls) == 2  # same number of collectives as with positives
    assert losses.num_pos == 0 and losses.reg == 0 and losses.centerness == 0
    # all anchors are negatives, normalised by max(N_pos, 1) = 1
    expected = token_focal_loss(logits, torch.zeros_like(logits), torch.ones(1, 4))
    torch.testing.assert_close(losses.token, expected)
    losses.total.backward()
    assert reg.grad is not None and reg.grad.abs().sum() == 0


def test_bad_inputs_name_the_problem() -> None:
    anchors, counts, targets = _setup()
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        grounding_losses(
            torch.zeros(1, anchors.shape[0], 5),
            torch.zeros(1, anchors.shape[0], 4),
            torch.zeros(1, anchors.shape[0]),
            anchors,
            counts,
            targets,
            torch.ones(1, 5),
        )
    with pytest.raises(ValueError, match=r"positive_maps\[0\] has shape"):
        GroundingTargets(boxes=[torch.zeros(2, 4)], positive_maps=[torch.zeros(3, 4)])


def test_should_skip_batch() -> None:
    def targets(counts: list[int]) -> GroundingTargets:
        return GroundingTargets([torch.zeros(n, 4) for n in counts], [torch.zeros(n, 3) for n in counts])

    assert should_skip_batch(targets([0, 0]))
    assert should_skip_batch(targets([1, 0]))  # 50 % empty > 10 %
    assert not should_skip_batch(targets([1, 2]))
    assert not should_skip_batch(targets([1] * 10 + [0]))  # 1/11 = 9 % empty
    assert should_skip_batch(targets([1] * 8 + [0]))  # 1/9 = 11 % empty
