"""ContrastiveHead: loss against an explicit float64 loop, queue bookkeeping, temperature, gather, gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fiber_heads import ContrastiveHead, ContrastiveOutput

D = 8


def unit(b: int, d: int = D) -> torch.Tensor:
    return F.normalize(torch.randn(b, d), dim=-1)


def ref_itc(img, txt, q_img, q_txt, temp: float) -> float:
    """½ (CE_i2t + CE_t2i) with explicit loops in float64 (docs/reference/training.md §1.4)."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    q_img = np.asarray(q_img, np.float64).reshape(-1, img.shape[1])
    q_txt = np.asarray(q_txt, np.float64).reshape(-1, img.shape[1])
    all_txt = np.concatenate([txt, q_txt])
    all_img = np.concatenate([img, q_img])
    total = 0.0
    for queries, keys in ((img, all_txt), (txt, all_img)):
        ce = 0.0
        for i, q in enumerate(queries):
            s = [float(q @ k) / temp for k in keys]
            m = max(s)
            lse = m + math.log(sum(math.exp(x - m) for x in s))
            ce += lse - s[i]
        total += ce / len(queries)
    return 0.5 * total


def test_loss_without_queue_matches_reference() -> None:
    head = ContrastiveHead(16, 12, D)
    img, txt = unit(5), unit(5)
    out = head(img, txt)
    assert isinstance(out, ContrastiveOutput)
    assert out.logits["i2t"].shape == (5, 5) and out.logits["t2i"].shape == (5, 5)
    assert out.num_valid == 5
    assert out.loss is not None and out.loss.item() == pytest.approx(ref_itc(img, txt, [], [], 0.07), rel=1e-5)
    torch.testing.assert_close(out.logits["t2i"], out.logits["i2t"].t())
    assert out.logs["itc/temperature"].item() == pytest.approx(0.07)


def test_queue_fills_wraps_and_enters_loss() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=8).train()
    steps = [(unit(3), unit(3), torch.arange(3) + 10 * s) for s in range(3)]
    history_img: list[torch.Tensor] = []
    history_txt: list[torch.Tensor] = []
    for s, (img, txt, idx) in enumerate(steps):
        out = head(img, txt, index=idx)
        q = min(3 * s, 8)
        assert out.logits["i2t"].shape == (3, 3 + q)
        # Before any wrap-around the queue holds the previous steps in order.
        q_img = torch.cat(history_img)[:q] if history_img else torch.zeros(0, D)
        q_txt = torch.cat(history_txt)[:q] if history_txt else torch.zeros(0, D)
        assert out.loss.item() == pytest.approx(ref_itc(img, txt, q_img, q_txt, 0.07), rel=1e-5)
        assert out.column_index.tolist() == idx.tolist() + [i for t in steps[:s] for i in t[2].tolist()][:q]
        history_img.append(img)
        history_txt.append(txt)
    # 9 entries written into 8 slots: the 9th (step 2, row 2) overwrote slot 0.
    assert head.queue_total.item() == 9 and head.queue_ptr.item() == 1
    expected_img = torch.cat([steps[2][0][2:3], steps[0][0][1:], steps[1][0], steps[2][0][:2]])
    torch.testing.assert_close(head.image_queue, expected_img)
    assert head.index_queue.tolist() == [22, 1, 2, 10, 11, 12, 20, 21]
    assert head.num_filled == 8


def test_enqueue_more_than_queue_size_keeps_latest() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=4).train()
    head(unit(3), unit(3), index=torch.tensor([0, 1, 2]))  # ptr -> 3
    img = unit(6)
    head(img, unit(6), index=torch.arange(100, 106))
    # Entries 100..105 map to slots 3,0,1,2,3,0; only the last 4 (102..105, in slots 1,2,3,0) survive.
    assert head.queue_ptr.item() == (3 + 6) % 4 and head.queue_total.item() == 9
    assert head.index_queue.tolist() == [105, 102, 103, 104]
    torch.testing.assert_close(head.image_queue, img[[5, 2, 3, 4]])


def test_queue_only_updates_in_training_and_when_asked() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=6)
    head.eval()
    head(unit(2), unit(2))
    assert head.queue_total.item() == 0
    head.train()
    head(unit(2), unit(2), update_queue=False)
    assert head.queue_total.item() == 0
    head(unit(2), unit(2))
    assert head.queue_total.item() == 2 and head.index_queue.tolist() == [-1] * 6


def test_queue_state_roundtrip_and_errors() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=5).train()
    head(unit(3), unit(3), index=torch.tensor([7, 8, 9]))
    state = head.queue_state()
    other = ContrastiveHead(16, 12, D, queue_size=5)
    other.load_queue_state(state)
    torch.testing.assert_close(other.image_queue, head.image_queue)
    assert other.num_filled == 3 and other.index_queue.tolist()[:3] == [7, 8, 9]
    with pytest.raises(ValueError, match="image_queue"):
        ContrastiveHead(16, 12, D, queue_size=4).load_queue_state(state)
    with pytest.raises(KeyError, match="queue_ptr"):
        other.load_queue_state({k: v for k, v in state.items() if k != "queue_ptr"})


def test_compat_mode_scores_noise_queue_from_first_step() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=6, compat_queue_noise=True).train()
    noise_img, noise_txt = head.image_queue.clone(), head.text_queue.clone()
    norms = noise_img.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # unnormalised noise
    img, txt = unit(2), unit(2)
    out = head(img, txt)
    assert out.logits["i2t"].shape == (2, 8)
    assert out.num_valid == 2  # nothing filled yet: only the local columns may be sampled
    assert out.loss.item() == pytest.approx(ref_itc(img, txt, noise_img, noise_txt, 0.07), rel=1e-5)
    out2 = head(unit(2), unit(2))
    assert out2.logits["i2t"].shape == (2, 8) and out2.num_valid == 4


@pytest.mark.parametrize(("value", "clamped"), [(5.0, 1.0), (1e-5, 0.001), (0.3, 0.3)])
def test_temperature_clamped_in_place(value: float, clamped: float) -> None:
    head = ContrastiveHead(16, 12, D)
    param = head.temp
    with torch.no_grad():
        head.temp.fill_(value)
    img, txt = unit(4), unit(4)
    out = head(img, txt)
    assert head.temp is param and head.temp.item() == pytest.approx(clamped)
    assert out.logs["itc/temperature"].item() == pytest.approx(clamped)
    assert out.loss.item() == pytest.approx(ref_itc(img, txt, [], [], clamped), rel=1e-4)


def test_bad_temperature_arguments() -> None:
    with pytest.raises(ValueError, match="temperature_init"):
        ContrastiveHead(4, 4, 4, temperature_init=2.0)
    with pytest.raises(ValueError, match="temperature_range"):
        ContrastiveHead(4, 4, 4, temperature_range=(0.0, 1.0))


class RollGather:
    """Fake 2-rank all-gather: rank 0 is ``x``, the other rank holds ``x`` rolled (indices + 100)."""

    def __init__(self, this_rank: int = 0) -> None:
        self.this_rank = this_rank
        self.calls = 0

    def other(self, x: torch.Tensor) -> torch.Tensor:
        return x + 100 if not x.is_floating_point() else x.roll(1, dims=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        parts = [x, self.other(x)] if self.this_rank == 0 else [self.other(x), x]
        return torch.cat(parts)


def test_gather_feeds_queue_with_all_ranks() -> None:
    gather = RollGather()
    head = ContrastiveHead(16, 12, D, queue_size=8, gather=gather).train()
    img, txt = unit(3), unit(3)
    out = head(img, txt, index=torch.tensor([0, 1, 2]))
    # The loss itself is local (docs/reference/training.md §1.4): the gathered features only enter through the queue.
    assert out.logits["i2t"].shape == (3, 3)
    assert head.queue_total.item() == 6
    torch.testing.assert_close(head.image_queue[:6], torch.cat([img, img.roll(1, 0)]))
    torch.testing.assert_close(head.text_queue[:6], torch.cat([txt, txt.roll(1, 0)]))
    assert head.index_queue[:6].tolist() == [0, 1, 2, 100, 101, 102]
    img2, txt2 = unit(3), unit(3)
    out2 = head(img2, txt2)
    assert out2.logits["i2t"].shape == (3, 9)
    q_img = torch.cat([img, img.roll(1, 0)])
    q_txt = torch.cat([txt, txt.roll(1, 0)])
    assert out2.loss.item() == pytest.approx(ref_itc(img2, txt2, q_img, q_txt, 0.07), rel=1e-5)


def clip_ref(all_img: torch.Tensor, all_txt: torch.Tensor, temp: float) -> float:
    logits = all_img.double() @ all_txt.double().t() / temp
    labels = torch.arange(len(all_img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).item()


def test_gathered_global_loss() -> None:
    head = ContrastiveHead(16, 12, D, gather=RollGather())
    img, txt = unit(3), unit(3)
    out = head(img, txt, index=torch.tensor([5, 6, 7]))
    all_img, all_txt = torch.cat([img, img.roll(1, 0)]), torch.cat([txt, txt.roll(1, 0)])
    assert out.logits["i2t"].shape == (6, 6)
    torch.testing.assert_close(out.logits["i2t"], all_img @ all_txt.t() / 0.07)
    assert out.loss.item() == pytest.approx(clip_ref(all_img, all_txt, 0.07), rel=1e-5)
    assert out.targets.tolist() == list(range(6))
    assert out.column_index.tolist() == [5, 6, 7, 105, 106, 107]


def test_gathered_local_loss_uses_rank_offset() -> None:
    head = ContrastiveHead(16, 12, D, gather=RollGather(this_rank=1), local_loss=True, rank=1)
    img, txt = unit(3), unit(3)
    out = head(img, txt)
    all_img, all_txt = torch.cat([img.roll(1, 0), img]), torch.cat([txt.roll(1, 0), txt])
    assert out.logits["i2t"].shape == (3, 6)
    assert out.targets.tolist() == [3, 4, 5]
    logits_i2t = img.double() @ all_txt.double().t() / 0.07
    logits_t2i = txt.double() @ all_img.double().t() / 0.07
    t = torch.arange(3) + 3
    ref = 0.5 * (F.cross_entropy(logits_i2t, t) + F.cross_entropy(logits_t2i, t)).item()
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert out.logs["itc/acc_i2t"].item() == pytest.approx((logits_i2t.argmax(1) == t).double().mean().item())


def test_stop_gradient_on_other_side() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=4).train()
    head(unit(2), unit(2))  # something in the queue
    img = unit(2).requires_grad_(True)
    txt = unit(2).requires_grad_(True)
    out = head(img, txt)
    F.cross_entropy(out.logits["i2t"], out.targets).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert txt.grad is None  # captions enter the i2t direction only detached
    assert head.temp.grad is not None and head.temp.grad.abs() > 0


def test_gathered_mode_has_no_stop_gradient() -> None:
    head = ContrastiveHead(16, 12, D, gather=lambda x: x)
    img = unit(3).requires_grad_(True)
    txt = unit(3).requires_grad_(True)
    out = head(img, txt)
    F.cross_entropy(out.logits["i2t"], out.targets).backward()
    assert img.grad is not None and txt.grad is not None
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


@dataclass(frozen=True)
class Img:
    tokens: torch.Tensor


@dataclass(frozen=True)
class Txt:
    hidden: torch.Tensor
    mask: torch.Tensor


def test_embeddings_follow_itc_path() -> None:
    head = ContrastiveHead(16, 12, D)
    tokens = torch.randn(2, 5, 16)
    hidden = torch.randn(2, 4, 12)
    emb_i = head.embed_image(Img(tokens))
    emb_t = head.embed_text(Txt(hidden, torch.ones(2, 4, dtype=torch.bool)))
    # Manual: transform every token, average, pooler dense + tanh, L2.
    ti, pi = head.cross_modal_image_transform_itc, head.cross_modal_image_pooler_itc.dense
    per_token = torch.stack([torch.stack([ti.weight @ tok + ti.bias for tok in sample]) for sample in tokens])
    ref_i = torch.tanh(per_token.mean(1) @ pi.weight.t() + pi.bias)
    torch.testing.assert_close(emb_i, ref_i / ref_i.norm(dim=1, keepdim=True))
    tt, pt = head.cross_modal_text_transform_itc, head.cross_modal_text_pooler_itc.dense
    ref_t = torch.tanh((hidden[:, 0] @ tt.weight.t() + tt.bias) @ pt.weight.t() + pt.bias)
    torch.testing.assert_close(emb_t, ref_t / ref_t.norm(dim=1, keepdim=True))
    torch.testing.assert_close(head.similarity(emb_i, emb_t), F.cosine_similarity(emb_i[:, None], emb_t[None], dim=-1))
    with pytest.raises(ValueError, match="image.tokens"):
        head.embed_image(Img(torch.randn(2, 5, 12)))


def test_state_dict_names_match_official_subkeys() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=4)
    assert set(head.state_dict()) == {
        "temp",
        "cross_modal_image_transform_itc.weight",
        "cross_modal_image_transform_itc.bias",
        "cross_modal_text_transform_itc.weight",
        "cross_modal_text_transform_itc.bias",
        "cross_modal_image_pooler_itc.dense.weight",
        "cross_modal_image_pooler_itc.dense.bias",
        "cross_modal_text_pooler_itc.dense.weight",
        "cross_modal_text_pooler_itc.dense.bias",
    }
    assert head.temp.shape == ()


def test_logits_are_fp32_under_autocast() -> None:
    head = ContrastiveHead(16, 12, D, queue_size=4).train()
    img, txt = unit(3), unit(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(img.bfloat16(), txt.bfloat16())
    assert out.logits["i2t"].dtype == torch.float32 and out.loss.dtype == torch.float32
    assert head.image_queue.dtype == torch.float32 and head.queue_total.item() == 3
