"""Detection → grounding prompts (docs/reference/training.md §3.8, docs/reference/data-formats.md §11.4).

A detection dataset is used as grounding data by writing its class names into a caption ("cat. dog. car")
and pointing every box at the character span of its class name. In training the caption holds the classes
present in the image plus sampled negative classes, within a token budget; at evaluation it holds every class
(split into chunks when the label space does not fit in one caption, e.g. LVIS).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fiber_data.types import Tokenizer

__all__ = [
    "DetectionPromptSampler",
    "Prompt",
    "build_prompt",
    "chunk_prompts",
    "clean_class_name",
    "token_counter",
]

_PARENS = re.compile(r"\([^)]*\)")


def clean_class_name(name: str) -> str:
    """Class name as written into prompts: parenthesised parts removed, ``_`` → space, spaces collapsed.

    >>> clean_class_name("bat_(animal)")
    'bat'
    """
    name = _PARENS.sub("", name).replace("_", " ")
    return re.sub(r"\s+", " ", name).strip()


def token_counter(tokenizer: Tokenizer, *, limit: int = 4096) -> Callable[[str], int]:
    """A function counting the tokens of a string without ``<s>``/``</s>``, for any Tokenizer."""

    def count(text: str) -> int:
        enc = tokenizer([text], max_length=limit, padding="longest")
        return int(enc.attention_mask[0].sum()) - 2

    return count


@dataclass(frozen=True)
class Prompt:
    """A class-name caption.

    Attributes:
        caption: the names joined by the separator (no trailing separator).
        labels: the labels in caption order.
        spans: per label, the ``(start, end)`` character span of its name in ``caption``.
    """

    caption: str
    labels: tuple[int, ...]
    spans: Mapping[int, tuple[int, int]]

    def tokens_positive(self, labels: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Per box label, its span list (empty for a label not in the prompt)."""
        return [[self.spans[int(lab)]] if int(lab) in self.spans else [] for lab in labels]


def build_prompt(
    labels: Sequence[int],
    names: Mapping[int, str],
    *,
    separator: str = ". ",
    prefixes: Mapping[int, str] | None = None,
    suffixes: Mapping[int, str] | None = None,
) -> Prompt:
    """Join the (cleaned) names of ``labels`` in the given order.

    Args:
        labels: label ids, in caption order.
        names: label id → class name (cleaned with :func:`clean_class_name`).
        separator: between entries (``". "`` in the reference).
        prefixes / suffixes: ODinW-style text around a name (docs/reference/data-formats.md §11.4); the grounded span is the
            name only.

    Returns:
        The :class:`Prompt`.
    """
    caption = ""
    spans: dict[int, tuple[int, int]] = {}
    for k, lab in enumerate(labels):
        if k:
            caption += separator
        caption += (prefixes or {}).get(lab, "")
        name = clean_class_name(names[lab])
        spans[int(lab)] = (len(caption), len(caption) + len(name))
        caption += name + (suffixes or {}).get(lab, "")
    return Prompt(caption=caption, labels=tuple(int(x) for x in labels), spans=spans)


def chunk_prompts(
    labels: Sequence[int],
    names: Mapping[int, str],
    count_tokens: Callable[[str], int],
    *,
    max_tokens: int = 254,
    max_labels: int | None = None,
    separator: str = ". ",
    prefixes: Mapping[int, str] | None = None,
    suffixes: Mapping[int, str] | None = None,
) -> list[Prompt]:
    """Evaluation prompts covering every label, split greedily into captions within the token budget.

    Args:
        labels: all label ids, in order.
        names: label id → class name.
        count_tokens: tokens of a string (see :func:`token_counter`).
        max_tokens: budget per caption, counting each entry as ``prefix + "name" + suffix + separator``.
        max_labels: optional cap on labels per chunk (fixed-size chunks, as LVIS evaluation uses).
        prefixes / suffixes: ODinW-style text around a name, as in :func:`build_prompt`.

    Returns:
        One :class:`Prompt` per chunk; every label appears in exactly one.
    """
    pre, suf = prefixes or {}, suffixes or {}
    chunks: list[list[int]] = [[]]
    used = 0
    for lab in labels:
        cost = count_tokens(pre.get(lab, "") + clean_class_name(names[lab]) + suf.get(lab, "") + separator)
        if cost > max_tokens:
            raise ValueError(f"class {lab} ({names[lab]!r}) alone needs {cost} tokens > max_tokens={max_tokens}")
        full = max_labels is not None and len(chunks[-1]) >= max_labels
        if chunks[-1] and (used + cost > max_tokens or full):
            chunks.append([])
            used = 0
        chunks[-1].append(int(lab))
        used += cost
    return [build_prompt(c, names, separator=separator, prefixes=pre, suffixes=suf) for c in chunks if c]


class DetectionPromptSampler:
    """Training prompts with sampled negatives (docs/reference/training.md §3.8, detection → grounding).

    Args:
        names: label id → class name for the whole label map (no background entry).
        count_tokens: tokens of a string (see :func:`token_counter`).
        max_tokens: caption budget (254 in the reference).
        control_probs: ``(p_a, p_b, p_c, p_d)``: with ``p_a`` one negative, with ``p_b`` none, with ``p_c`` all
            ``N_full`` negatives, otherwise a uniform number in ``[1, N_full]``. ``p_d`` must be 0 (the
            reference asserts it); the project's effective setting is ``(0.05, 0.05, 0.5, 0.0)``.
        max_negatives: ``N_full = min(max_negatives, len(names))``.
        separator: between class names.

    Call with the labels present in an image and a ``numpy`` generator; returns the :class:`Prompt` (labels
    of boxes whose class was dropped are absent from ``prompt.spans``).
    """

    def __init__(
        self,
        names: Mapping[int, str],
        count_tokens: Callable[[str], int],
        *,
        max_tokens: int = 254,
        control_probs: tuple[float, float, float, float] = (0.05, 0.05, 0.5, 0.0),
        max_negatives: int = 85,
        separator: str = ". ",
    ) -> None:
        if len(control_probs) != 4 or control_probs[3] != 0:
            raise ValueError(f"control_probs must be (p_a, p_b, p_c, 0.0), got {control_probs}")
        if sum(control_probs[:3]) > 1:
            raise ValueError(f"control probabilities sum to more than 1: {control_probs}")
        self.names = {int(k): v for k, v in names.items()}
        self.all_labels = np.asarray(sorted(self.names), dtype=np.int64)
        self.max_tokens = max_tokens
        self.control_probs = tuple(float(p) for p in control_probs)
        self.n_full = min(max_negatives, len(self.names))
        self.separator = separator
        self._cost = {lab: count_tokens(clean_class_name(n) + separator) for lab, n in self.names.items()}

    def num_negatives(self, rng: np.random.Generator) -> int:
        """Draw how many negatives to sample (step 3 of the reference)."""
        p_a, p_b, p_c, _ = self.control_probs
        u = rng.random()
        if u < p_a:
            return 1
        if u < p_a + p_b:
            return 0
        if u < p_a + p_b + p_c:
            return self.n_full
        return int(rng.integers(1, self.n_full + 1)) if self.n_full >= 1 else 0

    def __call__(self, present: Sequence[int], rng: np.random.Generator) -> Prompt:
        """Build one training prompt for an image whose boxes have labels ``present``."""
        positives = [int(x) for x in dict.fromkeys(int(p) for p in present)]
        unknown = [p for p in positives if p not in self.names]
        if unknown:
            raise KeyError(f"labels {unknown} are not in the label map")
        positives = [positives[i] for i in rng.permutation(len(positives))]
        kept: list[int] = []
        total = 0
        for lab in positives:
            total += self._cost[lab]
            if total > self.max_tokens:
                break  # this class and all later ones are dropped; `total` keeps the overflowing class
            kept.append(lab)
        n = self.num_negatives(rng)
        negatives: list[int] = []
        if n > 0:
            drawn = rng.choice(self.all_labels, size=n, replace=False).tolist()
            pos = set(positives)
            candidates = [int(x) for x in drawn if int(x) not in pos]
            candidates = [candidates[i] for i in rng.permutation(len(candidates))]
            budget = self.max_tokens - total
            for lab in candidates:
                budget -= self._cost[lab]
                if budget <= 0:
                    break
                negatives.append(lab)
        order = negatives + kept
        order = [order[i] for i in rng.permutation(len(order))]
        return build_prompt(order, self.names, separator=self.separator)
