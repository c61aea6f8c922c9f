"""Character spans of a caption → token positive maps (docs/reference/training.md §3.8, the fine-grained stage)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fiber_data.types import Encoding

__all__ = ["positive_map_from_spans"]


def positive_map_from_spans(
    encoding: Encoding,
    spans: Sequence[Sequence[tuple[int, int] | Sequence[int]]],
    *,
    batch_index: int = 0,
    normalize: bool = True,
) -> Tensor:
    """Character spans per box → token positive map (docs/reference/training.md §3.8, GLIP's construction).

    For every span ``[b, e)`` of a box: first token = token of character ``b`` (else ``b+1``, else ``b+2``),
    last token = token of character ``e-1`` (else ``e-2``, else ``e-3``); if either is still missing (span
    truncated away, or only white space) the span is skipped; tokens first..last are marked.

    Args:
        encoding: the tokenised caption(s).
        spans: per box, a list of ``(start, end)`` character spans (end exclusive).
        batch_index: which sample of ``encoding`` the spans refer to.
        normalize: divide each row by its sum (rows without any token stay all zero). GLIP adds ``1e-6`` to
            the denominator; here the division is exact, which only matters before binarisation.

    Returns:
        ``FloatTensor [num_boxes, L]``.
    """
    length = encoding.input_ids.shape[1]
    out = torch.zeros((len(spans), length), dtype=torch.float32)
    for j, box_spans in enumerate(spans):
        for span in box_spans:
            if len(span) != 2:
                raise ValueError(f"spans[{j}] holds {span!r}, expected (start, end)")
            b, e = int(span[0]), int(span[1])
            first = None
            for c in (b, b + 1, b + 2):
                first = encoding.char_to_token(batch_index, c)
                if first is not None:
                    break
            last = None
            for c in (e - 1, e - 2, e - 3):
                last = encoding.char_to_token(batch_index, c)
                if last is not None:
                    break
            if first is None or last is None:
                continue
            out[j, first : last + 1] = 1.0
    if normalize:
        out = out / out.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return out
