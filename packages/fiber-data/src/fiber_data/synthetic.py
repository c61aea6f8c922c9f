"""A seeded synthetic "world" of coloured shapes, written to disk in the real dataset formats.

Used for smoke runs and tests of the whole pipeline without downloads. It stands in for the formats of
docs/reference/data-formats.md §2 (Karpathy JSON), §3 (COCO captions), §6 (VQAv2), §8 (NLVR2), §9 (MDETR-style grounding
JSON) and §11.2 (COCO detection), so every loader of this package reads it unchanged.

Each image is a plain grey canvas cut into a 3 x 3 grid; ``min_objects..max_objects`` cells hold one shape
each, with a colour, a shape and a size (small / large) drawn uniformly. The shapes never overlap and are
drawn without anti-aliasing, so every pixel of an object has exactly its palette colour (with the default
lossless PNG) and its COCO box is the tight box of those pixels. Captions name colour, size, shape and grid
position of every object with paraphrased templates, so they discriminate images and image-text retrieval on
held-out images is learnable.

Layout written under ``root``::

    images/{train,val,test}/{split}_{image_id:06d}.png
    annotations/captions_{split}.json     COCO captions (docs/reference/data-formats.md §3)
    annotations/instances_{split}.json    COCO detection (§11.2); categories = "<colour> <shape>" (40 by
                                          default, supercategory = shape); each annotation also carries
                                          "attributes": {"color", "shape", "size", "position"}
    annotations/grounding_{split}.json    MDETR-style grounding (§9): one images entry per (image, caption),
                                          tokens_positive = the "<size> <colour> <shape>" phrase of each box
    annotations/refexp_{split}.json       RefCOCO-style grounding (§9.3): one entry and one box per referring
                                          expression, naming one object among distractors with the fewest
                                          attributes that single it out ("the circle", "the red circle", "the
                                          small red circle", "the red circle on the left" when two small red
                                          circles sit side by side); tokens_positive = the head noun
    annotations/karpathy.json             Karpathy split JSON (§2) over all splits
    annotations/vqa_questions_{split}.json     VQAv2 questions (§6), data_subtype = split; image files are
    annotations/vqa_annotations_{split}.json   "{split}_{image_id:06d}.png" (VQAv2Dataset image_template=
                                          SYNTHETIC_VQA_TEMPLATE, PNG worlds); 10 annotator answers each
    nlvr2/{split}.json                    NLVR2 JSON Lines (§8) about pairs of consecutive images, with the
    nlvr2/images/{split}/                 pair images as "<split>-0-<pair>-img0.png" / "-img1.png"
    tokenizer.json                        a ByteBPETokenizer trained on the train captions (optional)
    world.json                            manifest: config, counts, SHA-256 of the annotation files

Image ids are unique across splits (train first). Generation is deterministic: every image draws from its
own ``numpy`` generator seeded with ``(seed, split, index)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported where used: `fiber-data --help` reads SyntheticWorldConfig without numpy/Pillow
    import numpy as np
    from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

__all__ = [
    "PALETTE",
    "SYNTHETIC_VQA_TEMPLATE",
    "POSITIONS",
    "SHAPES",
    "SyntheticWorldConfig",
    "generate_world",
    "load_world_manifest",
]

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
#: ``image_template`` of :class:`~fiber_data.vqa.VQAv2Dataset` for the synthetic world's PNG images.
SYNTHETIC_VQA_TEMPLATE = "{subtype}_{image_id:06d}.png"

_MANIFEST = "world.json"
_FORMAT = "fiber-synthetic-world"
_VERSION = 3

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
_POSITION_WORDS = {
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
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
        tokenizer_vocab_size: train a :class:`~fiber_data.tokenization.ByteBPETokenizer` with this many ids on
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


@dataclass(frozen=True)
class _Object:
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


def _draw_image(config: SyntheticWorldConfig, rng: np.random.Generator) -> tuple[Image.Image, list[_Object]]:
    """Draw one image and return it with its objects."""
    from PIL import Image, ImageDraw

    s = config.image_size
    image = Image.new("RGB", (s, s), config.background)
    k = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=k, replace=False))
    objects: list[_Object] = []
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
        objects.append(_Object(color, shape, size, cell, (bx0, by0, bx1 - bx0, by1 - by0)))
    return image, objects


def _caption(objects: list[_Object], rng: np.random.Generator) -> tuple[str, list[tuple[int, int]]]:
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
        parts = [f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {noun}: "]
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
        phrase = f"{pick(_SIZE_WORDS[obj.size])} {obj.color} {pick(_SHAPE_WORDS[obj.shape])}"
        article = "an " if phrase[0] in "aeiou" else "a "
        text += article
        start = len(text)
        text += phrase
        spans[oi] = (start, len(text))
        text += " " + pick(_POSITION_WORDS[POSITIONS[obj.cell]])
    if template == 3:
        text = text[0].upper() + text[1:]
    return text + ".", spans


def _referring_expression(
    obj: _Object, objects: list[_Object], rng: np.random.Generator
) -> tuple[str, tuple[int, int]]:
    """An expression that singles ``obj`` out among ``objects``; returns it with the head noun's span.

    Attributes are added only as far as the distractors (objects of the same shape) require: colour, then the
    relative side ("on the left" / "on the right") when exactly two look-alikes sit in different grid columns,
    then size (and the side again), else the grid position.
    """
    shape_word = _SHAPE_WORDS[obj.shape][int(rng.integers(len(_SHAPE_WORDS[obj.shape])))]
    same_shape = [o for o in objects if o.shape == obj.shape]
    same_colour = [o for o in same_shape if o.color == obj.color]
    same_size = [o for o in same_colour if o.size == obj.size]

    def side(twins: list[_Object]) -> str | None:
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
        options = [p for p in _POSITION_WORDS[POSITIONS[obj.cell]] if p not in ("on the left", "on the right")]
        prefix, suffix = f"the {obj.color} ", " " + options[int(rng.integers(len(options)))]
    return prefix + shape_word + suffix, (len(prefix), len(prefix) + len(shape_word))


def _vqa_questions(
    objects: list[_Object], config: SyntheticWorldConfig, rng: np.random.Generator, count: int
) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Up to ``count`` distinct ``(question, answer, answer_type, wrong answers)`` about one image."""
    shapes_present = [o.shape for o in objects]
    pool: list[tuple[str, str, str, tuple[str, ...]]] = []
    numbers = tuple(str(k) for k in range(config.min_objects, config.max_objects + 1))
    pool.append(("How many shapes are there?", str(len(objects)), "number", numbers or ("1",)))
    for obj in objects:
        if shapes_present.count(obj.shape) == 1:
            pool.append((f"What color is the {obj.shape}?", obj.color, "other", config.colors))
        pool.append((f"What shape is in the {POSITIONS[obj.cell]}?", obj.shape, "other", config.shapes))
        same = [o for o in objects if (o.color, o.shape) == (obj.color, obj.shape)]
        if len(same) == 1:
            pool.append((f"Is the {obj.color} {obj.shape} large or small?", obj.size, "other", ("large", "small")))
    present = {(o.color, o.shape) for o in objects}
    obj = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
        pool.append((f"Is there a {obj.color} {obj.shape}?", "yes", "yes/no", ("yes", "no")))
    else:
        for _ in range(20):
            c = config.colors[int(rng.integers(len(config.colors)))]
            sh = config.shapes[int(rng.integers(len(config.shapes)))]
            if (c, sh) not in present:
                pool.append((f"Is there a {c} {sh}?", "no", "yes/no", ("yes", "no")))
                break
    order = rng.permutation(len(pool))[:count]
    return [pool[int(j)] for j in sorted(order)]


def _nlvr2_statement(
    left: list[_Object], right: list[_Object], config: SyntheticWorldConfig, rng: np.random.Generator
) -> tuple[str, bool]:
    """One statement about an image pair, true with probability 1/2 by construction."""
    want = bool(rng.random() < 0.5)
    kind = int(rng.integers(4))
    if kind == 0:
        truth = "more" if len(left) > len(right) else ("fewer" if len(left) < len(right) else "the same number of")
        others = [r for r in ("more", "fewer", "the same number of") if r != truth]
        rel = truth if want else others[int(rng.integers(2))]
        if rel == "the same number of":
            return "Both images contain the same number of shapes.", rel == truth
        return f"The left image contains {rel} shapes than the right image.", rel == truth
    if kind == 1:
        both = sorted({o.color for o in left} & {o.color for o in right})
        pool = both if want and both else [c for c in config.colors if c not in both]
        c = pool[int(rng.integers(len(pool)))]
        return f"Both images contain a {c} shape.", c in both
    if kind == 2:
        present = sorted({o.shape for o in right})
        absent = [sh for sh in config.shapes if sh not in present]
        pool = present if want or not absent else absent
        sh = pool[int(rng.integers(len(pool)))]
        return f"The right image contains a {sh}.", sh in present
    true_total = len(left) + len(right)
    total = true_total if want else true_total + (1 if rng.random() < 0.5 else -1)
    word = _NUMBERS[total] if total < len(_NUMBERS) else str(total)
    return f"There are {word} shapes in total.", total == true_total


def _write_nlvr2(
    root: Path, split: str, split_index: int, drawn: list[tuple[str, list[_Object]]], config: SyntheticWorldConfig
) -> int:
    """Write ``nlvr2/{split}.json`` and the pair images; returns the number of statements."""
    import numpy as np

    folder = root / "nlvr2" / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for pair in range(len(drawn) // 2):
        (left_name, left), (right_name, right) = drawn[2 * pair], drawn[2 * pair + 1]
        stem = f"{split}-0-{pair}"
        for side, name in (("img0", left_name), ("img1", right_name)):
            src, dst = root / "images" / split / name, folder / f"{stem}-{side}.png"
            try:
                os.link(src, dst)  # same bytes, no copy
            except OSError:
                shutil.copyfile(src, dst)
        rng = np.random.default_rng([config.seed, split_index, pair, 2])
        seen: set[str] = set()
        for _ in range(10 * config.nlvr2_statements_per_pair):
            if len(seen) == config.nlvr2_statements_per_pair:
                break
            sentence, label = _nlvr2_statement(left, right, config, rng)
            if sentence in seen:
                continue
            seen.add(sentence)
            record = {"identifier": f"{stem}-{len(seen) - 1}", "sentence": sentence, "label": str(label)}
            lines.append(json.dumps(record, separators=(",", ":")))
    (root / "nlvr2" / f"{split}.json").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")


def load_world_manifest(root: str | PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``world.json`` of ``root``, or ``None`` when there is none (or it is unreadable)."""
    p = Path(root) / _MANIFEST
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == _FORMAT else None


def _is_complete(root: Path, manifest: dict[str, Any], config: SyntheticWorldConfig) -> bool:
    if manifest.get("version") != _VERSION or manifest.get("config") != config.to_dict():
        return False
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            return False
    for split, counts in manifest.get("splits", {}).items():
        folder = root / "images" / split
        n = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
        if n != counts.get("images"):
            return False
    return True


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], object], Callable[[], object]]:
    """An ``(update, close)`` pair: tqdm when installed, else a plain line every 10 %."""
    if not enabled or total == 0:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="synthetic world", unit="img")
        return bar.update, bar.close
    except ImportError:
        state = {"done": 0, "next": max(1, total // 10)}

        def update(n: int) -> None:
            state["done"] += n
            if state["done"] >= state["next"] or state["done"] == total:
                log.info(f"synthetic world: {state['done']}/{total} images")
                state["next"] += max(1, total // 10)

        return update, lambda: None


def _split_sizes(config: SyntheticWorldConfig) -> Iterator[tuple[int, str, int]]:
    for i, (split, n) in enumerate(zip(SPLITS, (config.num_train, config.num_val, config.num_test))):
        yield i, split, n


def generate_world(
    root: str | PathLike[str],
    config: SyntheticWorldConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic dataset under ``root`` (idempotent).

    If ``root/world.json`` records the same config and every recorded file is intact, nothing is done. If it
    records another config, the previous world (``images/``, ``annotations/``, ``tokenizer.json``) is
    replaced.

    Args:
        root: output folder (created).
        config: what to draw; defaults to ``SyntheticWorldConfig()``.
        progress: show a progress bar (tqdm if installed, else plain lines).
        overwrite: also replace ``images/`` / ``annotations/`` folders that are not from a synthetic world.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileExistsError: ``root`` holds ``images/`` or ``annotations/`` without a world manifest and
            ``overwrite`` is false.
    """
    import numpy as np

    config = config or SyntheticWorldConfig()
    root = Path(root)
    manifest = load_world_manifest(root)
    if manifest is not None and _is_complete(root, manifest, config):
        return root
    owned = [root / "images", root / "annotations", root / "nlvr2", root / "tokenizer.json", root / _MANIFEST]
    if manifest is None and not overwrite and any(p.exists() for p in owned[:2]):
        raise FileExistsError(
            f"{root} already holds images/ or annotations/ that are not a synthetic world; pass overwrite=True "
            "(CLI: --overwrite) to replace them"
        )
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (root / "annotations").mkdir(parents=True)

    categories = config.categories()
    cat_id = {c["name"]: c["id"] for c in categories}
    update, close = _progress(config.num_train + config.num_val + config.num_test, progress)
    next_image_id = 1
    counts: dict[str, dict[str, int]] = {}
    karpathy_images: list[dict[str, Any]] = []
    train_captions: list[str] = []
    sent_id = 0
    for split_index, split, n in _split_sizes(config):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        images: list[dict[str, Any]] = []
        captions: list[dict[str, Any]] = []
        instances: list[dict[str, Any]] = []
        g_images: list[dict[str, Any]] = []
        g_anns: list[dict[str, Any]] = []
        r_images: list[dict[str, Any]] = []
        r_anns: list[dict[str, Any]] = []
        vqa_questions: list[dict[str, Any]] = []
        vqa_annotations: list[dict[str, Any]] = []
        drawn: list[tuple[str, list[_Object]]] = []
        for i in range(n):
            rng = np.random.default_rng([config.seed, split_index, i])
            image, objects = _draw_image(config, rng)
            image_id = next_image_id
            next_image_id += 1
            file_name = f"{split}_{image_id:06d}.{config.image_format}"
            if config.image_format == "png":
                image.save(folder / file_name, format="PNG", optimize=False, compress_level=6)
            else:
                image.save(folder / file_name, format="JPEG", quality=95, subsampling=0)
            s = config.image_size
            images.append({"id": image_id, "file_name": file_name, "height": s, "width": s})
            for obj in objects:
                x, y, w, h = obj.bbox
                instances.append(
                    {
                        "id": len(instances) + 1,
                        "image_id": image_id,
                        "category_id": cat_id[f"{obj.color} {obj.shape}"],
                        "bbox": [float(x), float(y), float(w), float(h)],
                        "area": float(w * h),
                        "iscrowd": 0,
                        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                        "attributes": {
                            "color": obj.color,
                            "shape": obj.shape,
                            "size": obj.size,
                            "position": POSITIONS[obj.cell],
                        },
                    }
                )
            seen: set[str] = set()
            sentences = []
            attempts = 0
            while len(seen) < config.captions_per_image and attempts < 50 * config.captions_per_image:
                attempts += 1
                text, spans = _caption(objects, rng)
                if text in seen:
                    continue
                seen.add(text)
                captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
                pair_id = len(g_images) + 1
                g_images.append(
                    {
                        "id": pair_id,
                        "file_name": file_name,
                        "height": s,
                        "width": s,
                        "caption": text,
                        "dataset_name": "synthetic",
                        "original_id": image_id,
                        "tokens_negative": [[0, len(text)]],
                    }
                )
                for obj, (b, e) in zip(objects, spans):
                    x, y, w, h = obj.bbox
                    g_anns.append(
                        {
                            "id": len(g_anns) + 1,
                            "image_id": pair_id,
                            "category_id": cat_id[f"{obj.color} {obj.shape}"],
                            "bbox": [float(x), float(y), float(w), float(h)],
                            "area": float(w * h),
                            "iscrowd": 0,
                            "tokens_positive": [[b, e]],
                        }
                    )
                tokens = text.lower().rstrip(".").replace(",", "").replace(":", "").split()
                sentences.append({"raw": text, "tokens": tokens, "imgid": len(karpathy_images), "sentid": sent_id})
                sent_id += 1
                if split == "train":
                    train_captions.append(text)
            karpathy_images.append(
                {
                    "filepath": split,
                    "filename": file_name,
                    "imgid": len(karpathy_images),
                    "cocoid": image_id,
                    "split": split,
                    "sentids": [x["sentid"] for x in sentences],
                    "sentences": sentences,
                }
            )
            drawn.append((file_name, objects))
            if config.referring_expressions:
                rrng = np.random.default_rng([config.seed, split_index, i, 3])
                for obj in objects:
                    expression, (b, e) = _referring_expression(obj, objects, rrng)
                    ref_id = len(r_images) + 1
                    r_images.append(
                        {
                            "id": ref_id,
                            "file_name": file_name,
                            "height": s,
                            "width": s,
                            "original_id": image_id,
                            "caption": expression,
                            "dataset_name": "refcoco",
                            "tokens_negative": [[b, e]],
                        }
                    )
                    x, y, w, h = obj.bbox
                    r_anns.append(
                        {
                            "id": ref_id,
                            "image_id": ref_id,
                            "category_id": cat_id[f"{obj.color} {obj.shape}"],
                            "bbox": [float(x), float(y), float(w), float(h)],
                            "area": float(w * h),
                            "iscrowd": 0,
                            "tokens_positive": [[b, e]],
                        }
                    )
            if config.vqa_questions_per_image:
                qrng = np.random.default_rng([config.seed, split_index, i, 1])
                for k, (question, answer, answer_type, noise) in enumerate(
                    _vqa_questions(objects, config, qrng, config.vqa_questions_per_image)
                ):
                    qid = image_id * 1000 + k
                    vqa_questions.append({"image_id": image_id, "question": question, "question_id": qid})
                    raw = [answer] * 10
                    # One or two annotators disagree, so the soft scores are not all 1.0.
                    for slot in range(int(qrng.integers(0, 3))):
                        raw[9 - slot] = noise[int(qrng.integers(len(noise)))]
                    vqa_annotations.append(
                        {
                            "question_id": qid,
                            "image_id": image_id,
                            "question_type": " ".join(question.lower().split()[:3]),
                            "answer_type": answer_type,
                            "multiple_choice_answer": answer,
                            "answers": [
                                {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(raw)
                            ],
                        }
                    )
            update(1)
        info = {"description": f"FIBER synthetic world ({split})", "version": str(_VERSION)}
        ann = root / "annotations"
        _write_json(ann / f"captions_{split}.json", {"info": info, "images": images, "annotations": captions})
        _write_json(
            ann / f"instances_{split}.json",
            {"info": info, "images": images, "annotations": instances, "categories": categories},
        )
        _write_json(
            ann / f"grounding_{split}.json",
            {"info": info, "images": g_images, "annotations": g_anns, "categories": categories},
        )
        counts[split] = {"images": len(images), "captions": len(captions), "objects": len(instances)}
        if config.referring_expressions:
            _write_json(
                ann / f"refexp_{split}.json",
                {"info": info, "images": r_images, "annotations": r_anns, "categories": categories},
            )
            counts[split]["referring_expressions"] = len(r_images)
        if config.vqa_questions_per_image:
            meta = {"info": info, "data_type": "synthetic", "data_subtype": split}
            _write_json(
                ann / f"vqa_questions_{split}.json", {**meta, "task_type": "Open-Ended", "questions": vqa_questions}
            )
            _write_json(ann / f"vqa_annotations_{split}.json", {**meta, "annotations": vqa_annotations})
            counts[split]["vqa_questions"] = len(vqa_questions)
        if config.nlvr2_statements_per_pair:
            counts[split]["nlvr2_statements"] = _write_nlvr2(root, split, split_index, drawn, config)
    close()
    _write_json(root / "annotations" / "karpathy.json", {"dataset": "synthetic", "images": karpathy_images})
    files = sorted(p.relative_to(root).as_posix() for p in (root / "annotations").iterdir())
    if config.nlvr2_statements_per_pair:
        files += sorted(p.relative_to(root).as_posix() for p in (root / "nlvr2").glob("*.json"))
    if config.tokenizer_vocab_size > 0:
        from fiber_data.tokenization import ByteBPETokenizer

        tok = ByteBPETokenizer.train(train_captions, max(config.tokenizer_vocab_size, 261))
        tok.save(root / "tokenizer.json")
        files.append("tokenizer.json")
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "config": config.to_dict(),
        "splits": counts,
        "categories": len(categories),
        "files": {rel: _sha256(root / rel) for rel in files},
    }
    (root / _MANIFEST).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return root
