"""Helpers for the fiber-backbones tests: tiny models with random weights and synthetic inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fiber_backbones import FiberBackbone, TextInputs, create_backbone


def make_text(lengths: Sequence[int], max_len: int | None = None, vocab: int = 1000, pad_id: int = 1) -> TextInputs:
    """Right-padded random token ids with the given real lengths (0 = fully padded row)."""
    length = max_len or max(max(lengths), 1)
    ids = torch.randint(3, vocab, (len(lengths), length))
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, pad_id)
    return TextInputs(ids, mask)


def randomize_gates(model: torch.nn.Module, value: float = 0.5) -> None:
    """Set every fusion gate to a non-zero value (gates are initialised to 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha_" in name:
                p.fill_(value)


def tiny(variant: str = "coarse", **overrides: Any) -> FiberBackbone:
    """``fiber-tiny`` in eval mode."""
    return create_backbone("fiber-tiny", variant=variant, **overrides).eval()
