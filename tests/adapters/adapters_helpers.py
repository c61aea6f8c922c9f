"""Helpers for the adapter tests: tiny fine-variant backbones, prompts and synthetic detection data."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fiber_backbones import FiberBackbone, TextInputs, create_backbone

VOCAB = 1000
COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def tiny_fine(variant: str = "fine_v2", **overrides: object) -> FiberBackbone:
    """``fiber-tiny`` (stage maps 64/128/256 channels at strides 8/16/32) in eval mode, without stochastic depth."""
    return create_backbone("fiber-tiny", variant=variant, **{"swin.drop_path_rate": 0.0, **overrides}).eval()


def make_text(lengths: Sequence[int], max_len: int | None = None, pad_id: int = 1, seed: int = 0) -> TextInputs:
    """Right-padded random token ids with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    length = max_len or max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), length), generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return TextInputs(ids.masked_fill(~mask, pad_id), mask)


def set_gates(model: torch.nn.Module, value: float) -> None:
    """Set every fusion gate (``alpha_i2t`` / ``alpha_t2i``, initialised to 0) to ``value``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha_" in name:
                p.fill_(value)


def gate_grads(model: torch.nn.Module, kind: str = "alpha_") -> list[torch.Tensor | None]:
    """Gradients of the fusion gates whose name contains ``kind`` (``"alpha_i2t"``, ``"alpha_t2i"``, all)."""
    return [p.grad for name, p in model.named_parameters() if kind in name]


def rectangles(
    n: int, height: int, width: int, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` grey images ``[3, height, width]`` in ``[0, 1]`` with 1-2 solid red/green/blue rectangles each.

    Returns:
        ``(images, targets)`` in torchvision's detection format: ``boxes [K, 4]`` (x0, y0, x1, y1 pixels) and
        ``labels [K]`` = colour index + 1 (0 is background).
    """
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.full((3, height, width), 0.5)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            w = int(torch.randint(width // 4, width // 2, (1,), generator=g))
            h = int(torch.randint(height // 4, height // 2, (1,), generator=g))
            x0 = int(torch.randint(0, width - w, (1,), generator=g))
            y0 = int(torch.randint(0, height - h, (1,), generator=g))
            colour = int(torch.randint(0, len(COLOURS), (1,), generator=g))
            img[:, y0 : y0 + h, x0 : x0 + w] = COLOURS[colour][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(colour + 1)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets
