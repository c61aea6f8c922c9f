"""The words of the synthetic world: paraphrased captions naming every object, and referring expressions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_data.synthetic.config import POSITIONS
from fiber_data.synthetic.scene import SceneObject

if TYPE_CHECKING:
    import numpy as np

__all__ = ["NUMBERS", "POSITION_WORDS", "SHAPE_WORDS", "SIZE_WORDS", "caption", "draw_captions", "referring_expression"]

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
POSITION_WORDS = {
    "top left": ("in the top left", "in the upper left corner", "at the top left"),
    "top": ("at the top", "in the top middle", "at the upper center"),
    "top right": ("in the top right", "in the upper right corner", "at the top right"),
    "left": ("on the left", "at the middle left", "in the left center"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the middle right", "in the right center"),
    "bottom left": ("in the bottom left", "in the lower left corner", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle", "at the lower center"),
    "bottom right": ("in the bottom right", "in the lower right corner", "at the bottom right"),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
    """One paraphrased caption naming every object; returns it with the span of each object's phrase."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    order = [int(i) for i in rng.permutation(len(objects))]
    template = int(rng.integers(4))
    n = len(objects)
    if template == 0:
        parts = ["a picture with "]
    elif template == 1:
        noun = "shape" if n == 1 else "shapes"
        parts = [f"{NUMBERS[n] if n < len(NUMBERS) else n} {noun}: "]
    elif template == 2:
        parts = ["the image shows "]
    else:
        parts = [""]
    text = "".join(parts)
    spans: list[tuple[int, int]] = [(0, 0)] * n
    for j, oi in enumerate(order):
        obj = objects[oi]
        if j > 0:
            text += ", and " if j == n - 1 and n > 2 else (" and " if j == n - 1 else ", ")
        phrase = f"{pick(SIZE_WORDS[obj.size])} {obj.color} {pick(SHAPE_WORDS[obj.shape])}"
        article = "an " if phrase[0] in "aeiou" else "a "
        text += article
        start = len(text)
        text += phrase
        spans[oi] = (start, len(text))
        text += " " + pick(POSITION_WORDS[POSITIONS[obj.cell]])
    if template == 3:
        text = text[0].upper() + text[1:]
    return text + ".", spans


def draw_captions(
    objects: list[SceneObject], rng: np.random.Generator, count: int
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Up to ``count`` distinct captions of one image (50 draws per caption at most), each with its spans."""
    seen: set[str] = set()
    out = []
    attempts = 0
    while len(seen) < count and attempts < 50 * count:
        attempts += 1
        text, spans = caption(objects, rng)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, spans))
    return out


def referring_expression(
    obj: SceneObject, objects: list[SceneObject], rng: np.random.Generator
) -> tuple[str, tuple[int, int]]:
    """An expression that singles ``obj`` out among ``objects``; returns it with the head noun's span.

    Attributes are added only as far as the distractors (objects of the same shape) require: colour, then the
    relative side ("on the left" / "on the right") when exactly two look-alikes sit in different grid columns,
    then size (and the side again), else the grid position.
    """
    shape_word = SHAPE_WORDS[obj.shape][int(rng.integers(len(SHAPE_WORDS[obj.shape])))]
    same_shape = [o for o in objects if o.shape == obj.shape]
    same_colour = [o for o in same_shape if o.color == obj.color]
    same_size = [o for o in same_colour if o.size == obj.size]

    def side(twins: list[SceneObject]) -> str | None:
        # "on the left" / "on the right" between exactly two look-alikes in different grid columns.
        columns = [o.cell % 3 for o in twins]
        if len(twins) != 2 or columns[0] == columns[1]:
            return None
        return " on the left" if obj.cell % 3 == min(columns) else " on the right"

    suffix = ""
    if len(same_shape) == 1:
        prefix = "the "
    elif len(same_colour) == 1:
        prefix = f"the {obj.color} "
    elif (s := side(same_colour)) is not None:
        prefix, suffix = f"the {obj.color} ", s
    elif len(same_size) == 1:
        prefix = f"the {obj.size} {obj.color} "
    elif (s := side(same_size)) is not None:
        prefix, suffix = f"the {obj.size} {obj.color} ", s
    else:
        # Grid cell; "on the left/right" would read as the relative side, so those phrasings are not used.
        options = [p for p in POSITION_WORDS[POSITIONS[obj.cell]] if p not in ("on the left", "on the right")]
        prefix, suffix = f"the {obj.color} ", " " + options[int(rng.integers(len(options)))]
    return prefix + shape_word + suffix, (len(prefix), len(prefix) + len(shape_word))
