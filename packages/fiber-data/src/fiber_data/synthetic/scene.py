"""One synthetic image: up to nine non-overlapping shapes on a 3 x 3 grid, with their tight COCO boxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fiber_data.synthetic.config import PALETTE, POSITIONS, SyntheticWorldConfig

if TYPE_CHECKING:  # imported where used
    import numpy as np
    from PIL import Image, ImageDraw

__all__ = ["SceneObject", "draw_image"]


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: colour, shape, size word, grid cell (row-major) and COCO ``xywh`` box."""

    color: str
    shape: str
    size: str
    cell: int
    bbox: tuple[int, int, int, int]  # COCO xywh, tight around the drawn pixels


def _draw_shape(mask_draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, d: int) -> None:
    """Draw a filled ``shape`` inside the ``d x d`` square at ``(x0, y0)`` on an ``L`` mask."""
    x1, y1 = x0 + d - 1, y0 + d - 1
    cx, cy = x0 + (d - 1) // 2, y0 + (d - 1) // 2
    if shape == "circle":
        mask_draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        mask_draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        mask_draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        mask_draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":
        t = max(2, d // 3)
        a = x0 + (d - t) // 2
        b = y0 + (d - t) // 2
        mask_draw.rectangle([a, y0, a + t - 1, y1], fill=255)
        mask_draw.rectangle([x0, b, x1, b + t - 1], fill=255)
    else:  # pragma: no cover - guarded by the config
        raise ValueError(f"unknown shape {shape!r}")


def draw_image(config: SyntheticWorldConfig, rng: np.random.Generator) -> tuple[Image.Image, list[SceneObject]]:
    """Draw one image and return it with its objects."""
    from PIL import Image, ImageDraw

    s = config.image_size
    image = Image.new("RGB", (s, s), config.background)
    k = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=k, replace=False))
    objects: list[SceneObject] = []
    for cell in cells:
        color = config.colors[int(rng.integers(len(config.colors)))]
        shape = config.shapes[int(rng.integers(len(config.shapes)))]
        size = "large" if rng.random() < 0.5 else "small"
        # Cell bounds with integer arithmetic; a 1-pixel margin keeps neighbouring shapes apart.
        row, col = divmod(cell, 3)
        cx0, cx1 = col * s // 3 + 1, (col + 1) * s // 3 - 1
        cy0, cy1 = row * s // 3 + 1, (row + 1) * s // 3 - 1
        span = min(cx1 - cx0, cy1 - cy0)
        d = max(5, round(span * (0.85 if size == "large" else 0.45)))
        x0 = cx0 + int(rng.integers(0, cx1 - cx0 - d + 1))
        y0 = cy0 + int(rng.integers(0, cy1 - cy0 - d + 1))
        mask = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, x0, y0, d)
        bx0, by0, bx1, by1 = mask.getbbox() or (x0, y0, x0 + 1, y0 + 1)
        image.paste(PALETTE[color], mask=mask)
        objects.append(SceneObject(color, shape, size, cell, (bx0, by0, bx1 - bx0, by1 - by0)))
    return image, objects
