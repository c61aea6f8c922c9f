"""Captioning: decoder adapters, token losses and decoding (docs/reference/architecture.md §8.3, docs/reference/training.md §2.6).

The decoding functions are pure functions over a *step callable*::

    step(tokens: LongTensor [N, t], rows: LongTensor [N]) -> logits FloatTensor [N, V]

which returns next-token logits for ``N`` prefixes; ``rows[n]`` is the batch item (image) prefix ``n``
belongs to, so the caller can select that image's features. Nothing here knows about a backbone.

- :func:`greedy_decode`: argmax decoding.
- :func:`beam_search`: the reference's beam search: the first step takes the ``K`` most probable first
  tokens; afterwards candidates over ``beam x vocabulary`` are ranked by cumulative log-probability divided by
  the number of tokens generated so far (length normalisation); a hypothesis finishes at ``</s>`` or pad and
  keeps its score; banned ids get logit -10000. With ``dedupe_finished=False`` (reference parity) every
  vocabulary continuation of a finished hypothesis carries its score, so it can fill several beam slots;
  ``True`` lets it continue only with pad.
- :func:`sample_decode`: ancestral sampling over the full softmax (CIDEr optimisation).
- :func:`caption_mle_loss`, :func:`sequence_mean_logprob`, :func:`self_critical_loss`: training losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fiber_heads.init import init_head_weights

__all__ = [
    "BANNED_LOGIT",
    "BeamSearchOutput",
    "CaptionAdapters",
    "StepFn",
    "beam_search",
    "caption_mle_loss",
    "greedy_decode",
    "sample_decode",
    "self_critical_loss",
    "sequence_mean_logprob",
    "shift_targets",
]

StepFn = Callable[[Tensor, Tensor], Tensor]
"""``(tokens [N, t], rows [N]) -> next-token logits [N, V]``."""

BANNED_LOGIT = -10000.0
"""Logit given to banned tokens (the reference's value for ``<mask>``)."""


class CaptionAdapters(nn.ModuleList):
    """Per-text-layer linear adapters of the image tokens fed to the decoder's t2i cross-attention.

    A ``ModuleList`` so that its keys equal the official ``cross_modal_att_layers.{k}`` (FIBER-B: ten
    ``Linear(1024 -> 512)``, of which layers 6-9 are used; layers 10-11 attend to the raw 1024-d tokens).
    ``out_dims`` maps each text layer that needs an adapter to its cross-attention key width; the list is
    ``max(layer) + 1`` long and unused entries (dead weights, as in the reference) get the width of the first
    used one.

    Args:
        image_dim: width ``C_img`` of the un-fused last-stage image tokens.
        out_dims: ``{text layer: K/V width of its t2i branch}`` for the layers that need adapting.
    """

    def __init__(self, image_dim: int, out_dims: Mapping[int, int]) -> None:
        dims = dict(out_dims)
        n = max(dims) + 1 if dims else 0
        default = dims[min(dims)] if dims else image_dim
        super().__init__(nn.Linear(image_dim, dims.get(k, default)) for k in range(n))
        self.image_dim = image_dim
        self.out_dims = dims
        init_head_weights(self)

    def adapt(self, image_tokens: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """``{layer: image tokens for that layer's t2i branch}``.

        Args:
            image_tokens: ``[B, N, C_img]``.
            layers: the decoder layers with a t2i branch; those in ``out_dims`` get their adapter, the others
                the raw tokens.

        Returns:
            ``{k: [B, N, out_dims[k]] or [B, N, C_img]}``.
        """
        return {k: self[k](image_tokens) if k in self.out_dims else image_tokens for k in layers}


# ---------------------------------------------------------------------------------------------------- losses


def shift_targets(input_ids: Tensor, pad_id: int) -> Tensor:
    """Next-token targets: ``input_ids`` shifted left by one with ``pad_id`` appended, ``[B, L] -> [B, L]``."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), pad_id)], dim=1)


def caption_mle_loss(logits: Tensor, input_ids: Tensor, pad_id: int) -> Tensor:
    """Mean token cross-entropy of teacher-forced decoding (docs/reference/training.md §2.6, MLE).

    Args:
        logits: ``[B, L, V]`` next-token logits at every position.
        input_ids: ``[B, L]`` ``<s> w_1 .. w_n </s> <pad>..``.
        pad_id: padding id; pad targets are ignored.

    Returns:
        Scalar mean over the non-pad targets.
    """
    targets = shift_targets(input_ids, pad_id)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=pad_id)


def sequence_mean_logprob(logits: Tensor, tokens: Tensor, pad_id: int) -> Tensor:
    """Mean log-probability of each sequence's non-pad generated tokens.

    Args:
        logits: ``[N, T, V]`` teacher-forced logits for ``tokens`` (position ``t`` predicts ``tokens[:, t+1]``).
        tokens: ``[N, T]`` ``<s>`` followed by the generated tokens, padded with ``pad_id``.
        pad_id: padding id.

    Returns:
        ``[N]`` mean over positions with a non-pad target (0 for an empty sequence).
    """
    targets = tokens[:, 1:]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    keep = (targets != pad_id).float()
    return (logp * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def self_critical_loss(mean_logprob: Tensor, reward: Tensor, baseline: Tensor, num_items: int) -> Tensor:
    """Policy-gradient loss ``sum(meanlogp * 100 * (baseline - reward)) / num_items`` (docs/reference/training.md §2.6).

    With ``baseline = 1`` this is the reference's fixed-baseline loss; with the greedy caption's reward it is
    self-critical sequence training.

    Args:
        mean_logprob: ``[N]`` from :func:`sequence_mean_logprob` (with gradient).
        reward: ``[N]`` CIDEr-D of each sample (raw scale, 1.0 = 100).
        baseline: ``[N]`` baseline reward of each sample.
        num_items: ``B``, the number of batch items the ``N`` samples were drawn for.
    """
    advantage = (baseline - reward).to(mean_logprob.dtype).detach()
    return (mean_logprob * 100.0 * advantage).sum() / num_items


# -------------------------------------------------------------------------------------------------- decoding


def _masked_logprobs(logits: Tensor, banned_ids: Sequence[int]) -> Tensor:
    logits = logits.float()
    if banned_ids:
        logits = logits.clone()
        logits[:, list(banned_ids)] = BANNED_LOGIT
    return F.log_softmax(logits, dim=-1)


def _decode_one_by_one(
    step: StepFn,
    rows: Tensor,
    pick: Callable[[Tensor], Tensor],
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    banned_ids: Sequence[int],
) -> Tensor:
    """Token-by-token decoding of ``R = len(rows)`` sequences: ``pick`` maps the masked log-probabilities
    ``[R, V]`` to the next ids ``[R]``; a finished sequence continues with ``pad_id``. Returns ``[R, T]``."""
    tokens = torch.full((rows.numel(), 1), bos_id, dtype=torch.long, device=rows.device)
    done = torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device)
    for _ in range(max_length - 1):
        nxt = pick(_masked_logprobs(step(tokens, rows), banned_ids))
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= (nxt == eos_id) | (nxt == pad_id)
        if bool(done.all()):
            break
    return tokens


def greedy_decode(
    step: StepFn,
    batch_size: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    banned_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
) -> Tensor:
    """Argmax decoding.

    Args:
        step: the step callable.
        batch_size: ``B``.
        bos_id / eos_id / pad_id: special ids; a sequence finishes at ``eos_id`` or ``pad_id``.
        max_length: total length including ``<s>`` (at most ``max_length - 1`` generated tokens).
        banned_ids: ids never generated (logit set to -10000).
        device: device of the returned tensor.

    Returns:
        ``LongTensor [B, T]`` starting with ``<s>``, ``T <= max_length``; after a finishing token only pads.
    """
    rows = torch.arange(batch_size, device=device)
    return _decode_one_by_one(
        step, rows, lambda logp: logp.argmax(dim=-1), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
        max_length=max_length, banned_ids=banned_ids,
    )  # fmt: skip


def sample_decode(
    step: StepFn,
    batch_size: int,
    num_samples: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Ancestral sampling of ``num_samples`` sequences per batch item (multinomial over the full softmax).

    Returns:
        ``(tokens [B * n, T], rows [B * n])``: the sequences (``<s>`` first, pads after the finishing token)
        and the batch item of each, item-major (``rows = [0]*n + [1]*n + ...``).
    """
    rows = torch.arange(batch_size, device=device).repeat_interleave(num_samples)
    tokens = _decode_one_by_one(
        step, rows, lambda logp: torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1),
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_length=max_length, banned_ids=banned_ids,
    )  # fmt: skip
    return tokens, rows


@dataclass(frozen=True)
class BeamSearchOutput:
    """Result of :func:`beam_search`.

    Attributes:
        sequences: ``LongTensor [B, K, T]`` hypotheses, best first (``<s>`` first, pads after the end).
        scores: ``FloatTensor [B, K]`` their ranking scores (length-normalised when asked for).
        lengths: ``LongTensor [B, K]`` generated tokens counted by the normalisation (finishing token included).
    """

    sequences: Tensor
    scores: Tensor
    lengths: Tensor

    @property
    def best(self) -> Tensor:
        """``LongTensor [B, T]``, the first beam of each item."""
        return self.sequences[:, 0]


def beam_search(
    step: StepFn,
    batch_size: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 5,
    max_length: int = 50,
    banned_ids: Sequence[int] = (),
    length_normalize: bool = True,
    dedupe_finished: bool = False,
    device: torch.device | str | None = None,
) -> BeamSearchOutput:
    """Beam search of docs/reference/training.md §2.6.

    Args:
        step: the step callable.
        batch_size: ``B``.
        bos_id / eos_id / pad_id: special ids; a hypothesis finishes at ``eos_id`` or ``pad_id``.
        beam_size: ``K`` (5 in the reference).
        max_length: total length including ``<s>`` (50; at most 49 generated tokens).
        banned_ids: ids whose logit is set to -10000 (the reference bans ``<mask>``).
        length_normalize: rank by cumulative log-probability / generated length (reference) instead of the sum.
        dedupe_finished: a finished hypothesis continues only with pad (one slot) instead of with every
            vocabulary entry at the same score (reference quirk: duplicate beams).
        device: device of the decoding state.

    Returns:
        :class:`BeamSearchOutput` (beams sorted best first).
    """
    k = beam_size
    rows = torch.arange(batch_size, device=device).repeat_interleave(k)  # [B*K]
    tokens = torch.full((batch_size * k, 1), bos_id, dtype=torch.long, device=device)
    cum = torch.zeros(batch_size * k, device=device)
    length = torch.zeros(batch_size * k, dtype=torch.long, device=device)
    done = torch.zeros(batch_size * k, dtype=torch.bool, device=device)
    score = torch.zeros(batch_size * k, device=device)
    for t in range(max_length - 1):
        logp = _masked_logprobs(step(tokens, rows), banned_ids)  # [B*K, V]
        vocab = logp.shape[-1]
        # Finished hypotheses: every continuation keeps the parent's cumulative score and length.
        cand_cum = torch.where(done[:, None], cum[:, None].expand(-1, vocab), cum[:, None] + logp)
        cand_len = torch.where(done, length, length + 1).float()[:, None].expand(-1, vocab)
        cand = cand_cum / cand_len if length_normalize else cand_cum.clone()
        if dedupe_finished:
            only_pad = torch.full_like(cand, float("-inf"))
            only_pad[:, pad_id] = cand[:, pad_id]
            cand = torch.where(done[:, None], only_pad, cand)
        if t == 0:
            # All beams start identical: expand only the first one.
            cand = cand.view(batch_size, k, vocab).clone()
            cand[:, 1:] = float("-inf")
        flat = cand.reshape(batch_size, k * vocab)
        top_score, top_idx = flat.topk(k, dim=1)  # [B, K]
        parent = (top_idx // vocab + torch.arange(batch_size, device=flat.device)[:, None] * k).reshape(-1)
        token = (top_idx % vocab).reshape(-1)
        parent_done = done[parent]
        token = torch.where(parent_done, torch.full_like(token, pad_id), token)
        cum = cand_cum.reshape(-1)[parent * vocab + (top_idx % vocab).reshape(-1)]
        length = torch.where(parent_done, length[parent], length[parent] + 1)
        done = parent_done | (token == eos_id) | (token == pad_id)
        score = top_score.reshape(-1)
        # a slot filled by an impossible candidate (-inf, e.g. K > V at the first step) stays impossible
        cum = torch.where(torch.isneginf(score), torch.full_like(cum, float("-inf")), cum)
        tokens = torch.cat([tokens[parent], token[:, None]], dim=1)
        if bool(done.all()):
            break
    t_len = tokens.shape[1]
    return BeamSearchOutput(
        sequences=tokens.view(batch_size, k, t_len),
        scores=score.view(batch_size, k),
        lengths=length.view(batch_size, k),
    )
