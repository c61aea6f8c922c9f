"""Shared helpers of the conversion tests: official layouts from the TSV fixtures, synthetic checkpoints.

Official state dicts are synthesised from ``tests/fixtures/official-checkpoint-layout/*.tsv`` (the ground-truth key
and shape lists). To keep FIBER-B sized dicts free (~1 GB each otherwise), every entry is a *distinct constant*
broadcast to its listed shape (``torch.tensor(c).expand(shape)``, no memory), so a tensor routed to the wrong key
is detected by its value; the relative-position tables, which the converter resizes, hold real random values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official-checkpoint-layout"

# file stem -> (source kind, our matching variant, image size)
LAYOUTS: dict[str, tuple[str, str, int]] = {
    "coarse-pretrain": ("coarse", "coarse", 384),
    "coarse-vqa": ("coarse", "coarse", 576),
    "coarse-nlvr2": ("coarse", "coarse", 384),
    "coarse-caption": ("coarse", "coarse", 576),
    "fine-mixed-nococo-flickr-objects365": ("fine", "fine_v2", 384),
    "fine-refcoco": ("fine", "fine_v3", 384),
}
BACKBONE_PREFIXES = {
    "coarse": ("vit_model.", "text_transformer."),
    "fine": ("fusion_backbone.backbone.body.", "fusion_backbone.language_backbone.body.model."),
}
INT_BUFFERS = ("position_ids", "relative_position_index", "queue_ptr", "queue_total", "text_input_queue")


def read_layout(stem: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``key -> (shape, dtype)`` of one TSV (fine files have no dtype column: int64 for index buffers)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for line in (FIXTURES / f"{stem}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        cols = line.split("\t")
        shape = tuple(int(s) for s in cols[1].strip("()").split(",") if s.strip())
        if len(cols) > 2:
            dtype = getattr(torch, cols[2].removeprefix("torch."))
        else:
            dtype = torch.int64 if any(b in cols[0] for b in INT_BUFFERS) else torch.float32
        out[cols[0]] = (shape, dtype)
    return out


def synth_official(stem: str, *, offset: float = 0.0, seed: int = 0) -> dict[str, Tensor]:
    """Official state dict of ``stem`` with the listed shapes/dtypes: distinct constants, random rel-pos tables."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for i, (key, (shape, dtype)) in enumerate(read_layout(stem).items()):
        if key.endswith("relative_position_bias_table"):
            out[key] = torch.randn(shape, generator=gen)
        else:
            out[key] = torch.tensor(i + 1 + offset, dtype=dtype).expand(shape)
    return out


def backbone_entries(stem: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The TSV entries under the two official tower prefixes."""
    kind = LAYOUTS[stem][0]
    return {k: v for k, v in read_layout(stem).items() if k.startswith(BACKBONE_PREFIXES[kind])}


def distinct_state(shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, Tensor]:
    """A state dict with a distinct constant per key (broadcast, no memory)."""
    return {k: torch.tensor(float(i + 1), dtype=dt).expand(s) for i, (k, (s, dt)) in enumerate(shapes.items())}


def same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` that is O(1) for the broadcast constants of :func:`synth_official` / :func:`distinct_state`."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() and all(s == 0 for s in a.stride()) and all(s == 0 for s in b.stride()):
        return bool(a.reshape(-1)[0] == b.reshape(-1)[0])
    return torch.equal(a, b)
