"""BERT-style masked-language-model corruption of token ids (docs/reference/training.md §1.3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["mask_tokens"]


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style MLM masking (docs/reference/training.md §1.3).

    Each real, non-special token is selected with ``probability``; a selected token becomes ``<mask>`` with
    probability 0.8, a uniformly random id in ``[0, vocab_size)`` with probability 0.1, and stays unchanged
    with probability 0.1. Special tokens and padding (``attention_mask == False``) are never selected.

    Args:
        input_ids: ``LongTensor [B, L]``.
        attention_mask: ``BoolTensor [B, L]`` (or 0/1 ints), ``True`` for real tokens.
        mask_token_id: id of ``<mask>``.
        vocab_size: size of the id space for random replacements.
        special_ids: ids never selected (``<s>``, ``</s>``, ``<pad>``, ...).
        probability: selection probability.
        generator: optional RNG for reproducible masks.

    Returns:
        ``(masked_ids, labels)``, both ``LongTensor [B, L]``: the corrupted ids, and the original ids at
        selected positions with ``-100`` everywhere else.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    ids = input_ids.long()
    device = ids.device
    candidates = attention_mask.bool().clone()
    specials = torch.tensor(sorted({int(s) for s in special_ids}), dtype=torch.long, device=device)
    if specials.numel():
        candidates &= ~torch.isin(ids, specials)

    def draw(p: float) -> Tensor:
        return torch.rand(ids.shape, generator=generator, device=device) < p

    selected = draw(probability) & candidates
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    to_mask = draw(0.8) & selected
    to_random = draw(0.5) & selected & ~to_mask  # half of the remaining 20 %
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=device, dtype=torch.long)
    masked = ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, labels
