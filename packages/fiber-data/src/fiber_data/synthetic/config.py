"""What the synthetic world draws: palette, shapes, grid positions and :class:`SyntheticWorldConfig`.

Imports neither numpy nor Pillow (``fiber-data --help`` reads the config's defaults).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["PALETTE", "POSITIONS", "SHAPES", "SPLITS", "SYNTHETIC_VQA_TEMPLATE", "SyntheticWorldConfig"]

#: Colour name → RGB. The default world uses all eight.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
#: Shapes that can be drawn.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
#: Grid cells in row-major order, as named in captions.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: ``image_template`` of :class:`~fiber_data.sources.vqa.VQAv2Dataset` for the synthetic world's PNG images.
SYNTHETIC_VQA_TEMPLATE = "{subtype}_{image_id:06d}.png"


@dataclass(frozen=True)
class SyntheticWorldConfig:
    """What :func:`generate_world` draws.

    Args:
        seed: master seed; the same config always gives byte-identical files.
        image_size: side of the square images in pixels (at least 24).
        num_train / num_val / num_test: images per split.
        captions_per_image: distinct captions written per image.
        min_objects / max_objects: objects per image (1..9, one per grid cell).
        colors: palette colour names used (keys of :data:`PALETTE`).
        shapes: shape names used (from :data:`SHAPES`).
        background: RGB of the canvas.
        image_format: ``"png"`` (lossless; pixel colours are exact) or ``"jpg"``.
        tokenizer_vocab_size: train a :class:`~fiber_data.text.tokenizer.ByteBPETokenizer` with this many ids on
            the train captions and save it as ``tokenizer.json``; 0 disables.
        vqa_questions_per_image: VQAv2-format questions per image (0 disables).
        nlvr2_statements_per_pair: NLVR2-format statements per image pair; consecutive images of a split form
            the pairs (0 disables).
        referring_expressions: write ``refexp_{split}.json`` (one referring expression per object).
    """

    seed: int = 0
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    captions_per_image: int = 3
    min_objects: int = 1
    max_objects: int = 3
    colors: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    background: tuple[int, int, int] = (128, 128, 128)
    image_format: Literal["png", "jpg"] = "png"
    tokenizer_vocab_size: int = 1000
    vqa_questions_per_image: int = 3
    nlvr2_statements_per_pair: int = 2
    referring_expressions: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24, got {self.image_size}")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got {self.min_objects}, {self.max_objects}"
            )
        if self.vqa_questions_per_image < 0 or self.nlvr2_statements_per_pair < 0:
            raise ValueError("vqa_questions_per_image and nlvr2_statements_per_pair must be >= 0")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown or not self.colors:
            raise ValueError(f"unknown colours {unknown}; choose from {list(PALETTE)}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes:
            raise ValueError(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        if len(self.background) != 3:
            raise ValueError("background must be an RGB triple")
        if self.background in [PALETTE[c] for c in self.colors]:
            raise ValueError("background must differ from every palette colour")
        # Normalise sequences to tuples so that equality and the manifest round trip are exact.
        object.__setattr__(self, "colors", tuple(self.colors))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the config (as stored in ``world.json``)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticWorldConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        for key in ("colors", "shapes", "background"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def categories(self) -> list[dict[str, Any]]:
        """COCO categories: one per (colour, shape), ids 1..K in colour-major order."""
        out = []
        for c in self.colors:
            for s in self.shapes:
                out.append({"id": len(out) + 1, "name": f"{c} {s}", "supercategory": s})
        return out
