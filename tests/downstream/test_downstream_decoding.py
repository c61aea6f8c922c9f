"""fiber_heads.captioning: greedy / beam / sampled decoding over a step callable, adapters and losses."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fiber_heads.captioning import (
    BANNED_LOGIT,
    CaptionAdapters,
    beam_search,
    caption_mle_loss,
    greedy_decode,
    sample_decode,
    self_critical_loss,
    sequence_mean_logprob,
    shift_targets,
)

BOS, PAD, EOS = 0, 1, 2
SPECIAL: dict[str, Any] = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


def markov_step(table: torch.Tensor, per_row: torch.Tensor | None = None):
    """A hand-made model: next-token logits depend on the last token only (plus an optional per-item bias)."""

    def step(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = table[tokens[:, -1]].clone()
        if per_row is not None:
            logits = logits + per_row[rows]
        return logits

    return step


def log_probs(table: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    t = table.clone()
    t[:, list(banned)] = BANNED_LOGIT
    return F.log_softmax(t, dim=-1)


def brute_force_best(table: torch.Tensor, max_new: int, banned: tuple[int, ...]) -> tuple[list[int], float]:
    """Enumerate every sequence of at most ``max_new`` tokens; score = mean log-probability (finished at
    </s>/pad or cut at ``max_new``)."""
    lp = log_probs(table, banned)
    vocab = table.shape[0]
    best: tuple[list[int], float] = ([], -math.inf)
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if any(t in (EOS, PAD) for t in seq[:-1]) or any(t in banned for t in seq):
                continue
            if n < max_new and seq[-1] not in (EOS, PAD):
                continue  # an unfinished sequence only counts at the length limit
            prev, total = BOS, 0.0
            for t in seq:
                total += float(lp[prev, t])
                prev = t
            if total / n > best[1]:
                best = (list(seq), total / n)
    return best


def strip(seq: torch.Tensor) -> list[int]:
    """Generated tokens up to and including the finishing token."""
    out = []
    for t in seq.tolist()[1:]:
        out.append(t)
        if t in (EOS, PAD):
            break
    return out


def test_beam_search_finds_the_sequence_greedy_misses() -> None:
    # vocabulary: <s> <pad> </s> a b ; greedy takes "a" (0.6) but everything after "a" is uncertain,
    # while "b" is followed by </s> with probability ~1: "b </s>" has the best mean log-probability.
    p = torch.full((5, 5), 1e-6)
    p[BOS, 3], p[BOS, 4] = 0.6, 0.4
    p[3, 2], p[3, 3], p[3, 4] = 1 / 3, 1 / 3, 1 / 3
    p[4, 2] = 1.0
    p[2, 1] = p[1, 1] = 1.0
    table = p.log()
    banned = (BOS, PAD)
    greedy = greedy_decode(markov_step(table), 1, max_length=4, banned_ids=banned, **SPECIAL)
    assert strip(greedy[0])[0] == 3
    out = beam_search(markov_step(table), 1, beam_size=2, max_length=4, banned_ids=banned, **SPECIAL)
    assert strip(out.best[0]) == [4, EOS]
    assert out.scores[0, 0].item() == pytest.approx(math.log(0.4) / 2, abs=1e-4)
    assert out.lengths[0, 0].item() == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_beam_equals_brute_force_maximum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab, max_new = 5, 3
    table = torch.randn(vocab, vocab, generator=gen) * 2.0
    banned = (BOS,)
    seq, score = brute_force_best(table, max_new, banned)
    # a beam wider than all live prefixes (4^3) keeps every hypothesis: the search is exact
    out = beam_search(
        markov_step(table), 1, beam_size=64, max_length=max_new + 1, banned_ids=banned, dedupe_finished=True, **SPECIAL
    )
    assert strip(out.best[0]) == seq
    assert out.scores[0, 0].item() == pytest.approx(score, abs=1e-5)
    assert torch.all(out.scores[0, :-1] >= out.scores[0, 1:])  # beams are sorted best first


def test_beam_size_one_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, batch = 9, 4
    table = torch.randn(vocab, vocab, generator=gen)
    per_row = torch.randn(batch, vocab, generator=gen)
    step = markov_step(table, per_row)
    greedy = greedy_decode(step, batch, max_length=12, banned_ids=(BOS, 8), **SPECIAL)
    beam = beam_search(step, batch, beam_size=1, max_length=12, banned_ids=(BOS, 8), **SPECIAL).best
    assert greedy.shape == beam.shape
    assert torch.equal(greedy, beam)
    assert not (greedy[:, 1:] == 8).any()  # banned token never generated


def test_finished_hypotheses_fill_several_beams_unless_deduplicated() -> None:
    # "</s>" right away is by far the best: in parity mode its pad continuations occupy every slot
    table = torch.full((5, 5), -5.0)
    table[BOS, EOS] = 5.0
    table[:, PAD] = -20.0
    parity = beam_search(markov_step(table), 1, beam_size=3, max_length=4, banned_ids=(BOS,), **SPECIAL)
    firsts = [strip(parity.sequences[0, b]) for b in range(3)]
    assert firsts == [[EOS]] * 3
    fixed = beam_search(
        markov_step(table), 1, beam_size=3, max_length=4, banned_ids=(BOS,), dedupe_finished=True, **SPECIAL
    )
    assert [strip(fixed.sequences[0, b]) for b in range(3)].count([EOS]) == 1


def test_sampling_follows_the_distribution_and_pads_after_the_end() -> None:
    table = torch.full((5, 5), -30.0)
    table[BOS, 3] = 0.0  # P(a)=P(b)=1/2 after <s>
    table[BOS, 4] = 0.0
    table[3, EOS] = table[4, EOS] = 0.0
    gen = torch.Generator().manual_seed(0)
    tokens, rows = sample_decode(markov_step(table), 2, 400, max_length=6, banned_ids=(BOS,), generator=gen, **SPECIAL)
    assert tokens.shape == (800, 3)  # stops once every sample finished
    assert torch.equal(rows, torch.arange(2).repeat_interleave(400))
    assert torch.all(tokens[:, 2] == EOS)
    share_a = (tokens[:, 1] == 3).float().mean().item()
    assert 0.4 < share_a < 0.6


def test_adapters_match_official_layout() -> None:
    adapters = CaptionAdapters(1024, {6: 512, 7: 512, 8: 512, 9: 512})
    keys = set(adapters.state_dict())
    assert keys == {f"{k}.{p}" for k in range(10) for p in ("weight", "bias")}
    x = torch.randn(2, 5, 1024)
    out = adapters.adapt(x, [6, 7, 8, 9, 10, 11])
    assert out[6].shape == (2, 5, 512) and out[10] is x
    assert torch.allclose(out[7], adapters[7](x))


def test_losses_against_hand_computation() -> None:
    ids = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 7, EOS, PAD, PAD]])
    assert torch.equal(shift_targets(ids, PAD), torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD]]))
    logits = torch.randn(2, 5, 9)
    lp = F.log_softmax(logits, -1)
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, EOS), (1, 0, 7), (1, 1, EOS)]
    expected = -sum((lp[b, t, y] for b, t, y in targets), torch.zeros(())) / len(targets)
    assert caption_mle_loss(logits, ids, PAD).item() == pytest.approx(expected.item(), rel=1e-5)
    mean = sequence_mean_logprob(logits, ids, PAD)
    assert mean[0].item() == pytest.approx(((lp[0, 0, 5] + lp[0, 1, 6] + lp[0, 2, EOS]) / 3).item(), rel=1e-5)
    assert mean[1].item() == pytest.approx(((lp[1, 0, 7] + lp[1, 1, EOS]) / 2).item(), rel=1e-5)
    # reference: sum(meanlogp * (100 - 100 * CIDEr)) / B with the fixed baseline 1.0
    reward = torch.tensor([0.5, 1.5])
    loss = self_critical_loss(mean, reward, torch.ones(2), num_items=1)
    assert loss.item() == pytest.approx((mean[0] * 50 + mean[1] * -50).item(), rel=1e-5)
