"""The words "left" and "right" of a caption under a horizontal image flip (docs/reference/training.md §3.9, §4.4).

:func:`flip_caption` swaps "left" and "right" (and "leftmost" / "rightmost") and moves every character span
accordingly; :func:`mentions_left_right` tells whether a caption says either. The reference flips images without
touching the caption (so "left"/"right" become wrong) and disables the flip for RefCOCO; see
:class:`~fiber_data.images.transforms.GroundingTransform` ``flip_text``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["flip_caption", "mentions_left_right"]

_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def mentions_left_right(text: str) -> bool:
    """Whether ``text`` contains the word "left", "right", "leftmost" or "rightmost" (any case)."""
    return _LEFT_RIGHT.search(text) is not None


def _swap_word(word: str) -> str:
    base, most = (word[:-4], word[-4:]) if len(word) > 5 else (word, "")
    new = "right" if base.lower() == "left" else "left"
    if base.isupper():
        new = new.upper()
    elif base[0].isupper():
        new = new.capitalize()
    return new + most


def flip_caption(
    caption: str, spans: Sequence[Sequence[tuple[int, int]]]
) -> tuple[str, tuple[tuple[tuple[int, int], ...], ...]]:
    """Swap the words "left" and "right" (and "leftmost" / "rightmost"; case kept) and move character spans.

    Args:
        caption: the text.
        spans: per box, its ``[start, end)`` character spans in ``caption``.

    Returns:
        ``(new caption, spans in the new caption)``. A span that starts or ends inside a swapped word is
        widened to that word's bounds.
    """
    pieces: list[str] = []
    # (old start, old end, new start, new end) of every swapped word, in order.
    moved: list[tuple[int, int, int, int]] = []
    last = 0
    length = 0
    for m in _LEFT_RIGHT.finditer(caption):
        pieces.append(caption[last : m.start()])
        length += m.start() - last
        new = _swap_word(m.group(0))
        moved.append((m.start(), m.end(), length, length + len(new)))
        pieces.append(new)
        length += len(new)
        last = m.end()
    pieces.append(caption[last:])
    text = "".join(pieces)

    def move(p: int, is_end: bool) -> int:
        shift = 0
        for o0, o1, n0, n1 in moved:
            if p >= o1:
                shift = n1 - o1
                continue
            if p > o0:  # inside a swapped word
                return n1 if is_end else n0
            break
        return p + shift

    new_spans = tuple(tuple((move(s, False), move(e, True)) for s, e in box) for box in spans)
    return text, new_spans
