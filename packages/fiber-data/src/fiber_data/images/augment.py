"""Training augmentations beyond the plain resizes of :mod:`fiber_data.images.transforms`.

Coarse-stage fine-tuning (docs/reference/training.md §2.1, the reference's ``albef_randaug``): :class:`CoarseTrainTransform`
= RandomResizedCrop(S, scale (0.5, 1.0), bicubic) → horizontal flip (p = 0.5, text unchanged) →
:class:`RandAugment` (N = 2 operations drawn with replacement, each applied with probability 0.5, magnitude
M = 7 of 10) → tensor → ImageNet normalisation. Written with PIL and torch only (no torchvision, no OpenCV).

Fine stage (docs/reference/training.md §3.9, §4.4; boxes in the "+1" convention of docs/reference/data-formats.md §12): the box
operations :func:`crop_boxes` / :func:`pad_boxes` (with :func:`~fiber_data.images.transforms.resize_boxes` and
:func:`~fiber_data.images.transforms.hflip_boxes`); the caption side of a horizontal flip is
:func:`~fiber_data.text.left_right.flip_caption`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

from fiber_data.images.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "RANDAUGMENT_OPS",
    "CoarseTrainTransform",
    "RandAugment",
    "crop_boxes",
    "pad_boxes",
    "random_resized_crop_params",
]

_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _sign(generator: torch.Generator | None) -> float:
    return 1.0 if _uniform(generator) < 0.5 else -1.0


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Crop window of RandomResizedCrop: area fraction in ``scale``, aspect ratio (w / h) in ``ratio``.

    Up to 10 draws of (area, log-uniform ratio); the first window that fits is placed uniformly. If none fits,
    the central crop with the ratio clamped to ``ratio`` (the whole image when its ratio is inside).

    Args:
        width, height: image size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio.
        generator: RNG.

    Returns:
        ``(left, top, crop_width, crop_height)`` in pixels.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * _uniform(generator))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# ----------------------------------------------------------------------------------------------------------------
# RandAugment operations. Each takes (image, magnitude level, generator) and returns a new PIL image. Levels map
# to arguments as in ALBEF's RandomAugment: rotate level/10 * 30 degrees, shear level/10 * 0.3, translate
# level/10 * 10 px (random sign for all three), enhance factor level/10 * 1.8 + 0.1; geometric ops fill grey 128.


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    # PIL's affine data maps *output* pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=_FILL)


def _identity(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return image.copy()


def _autocontrast(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return ImageOps.equalize(image)


def _enhance_factor(level: float) -> float:
    return level / _MAX_LEVEL * 1.8 + 0.1


def _brightness(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(_enhance_factor(level))


def _sharpness(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(_enhance_factor(level))


def _shear_x(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    shear = _sign(g) * level / _MAX_LEVEL * 0.3
    # PIL samples at pixel centres (y + 0.5); the -shear/2 offset keeps row 0 in place, as OpenCV's warp does.
    return _affine(image, (1.0, shear, -0.5 * shear, 0.0, 1.0, 0.0))


def _shear_y(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    shear = _sign(g) * level / _MAX_LEVEL * 0.3
    return _affine(image, (1.0, 0.0, 0.0, shear, 1.0, -0.5 * shear))


def _translate_x(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return _affine(image, (1.0, 0.0, -_sign(g) * level / _MAX_LEVEL * 10.0, 0.0, 1.0, 0.0))


def _translate_y(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -_sign(g) * level / _MAX_LEVEL * 10.0))


def _rotate(image: Image.Image, level: float, g: torch.Generator | None) -> Image.Image:
    angle = _sign(g) * level / _MAX_LEVEL * 30.0
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


#: The reference's operation list (docs/reference/training.md §2.1), in order.
RANDAUGMENT_OPS: dict[str, Callable[[Image.Image, float, torch.Generator | None], Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


class RandAugment:
    """ALBEF-style RandAugment on PIL images (docs/reference/training.md §2.1).

    Args:
        num_ops: operations drawn per image, with replacement (``N = 2``).
        magnitude: level ``M`` out of 10 (7: rotate ±21°, shear ±0.21, translate ±7 px, enhance 1.36).
        prob: probability that each drawn operation is applied (0.5).
        ops: operation names, a subset of :data:`RANDAUGMENT_OPS` (all ten by default).

    Call as ``augment(image, generator=None) -> PIL.Image``.
    """

    def __init__(
        self, num_ops: int = 2, magnitude: float = 7.0, prob: float = 0.5, ops: Sequence[str] | None = None
    ) -> None:
        names = list(RANDAUGMENT_OPS) if ops is None else list(ops)
        unknown = [n for n in names if n not in RANDAUGMENT_OPS]
        if unknown or not names:
            raise ValueError(f"unknown RandAugment ops {unknown}; choose from {list(RANDAUGMENT_OPS)}")
        if num_ops < 0 or not 0 <= magnitude <= _MAX_LEVEL or not 0.0 <= prob <= 1.0:
            raise ValueError(
                f"need num_ops >= 0, 0 <= magnitude <= 10, 0 <= prob <= 1; got {num_ops}, {magnitude}, {prob}"
            )
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.prob = float(prob)
        self.ops = tuple(names)

    def draw(self, generator: torch.Generator | None = None) -> list[str]:
        """The operations drawn for one image (before the per-operation coin flips)."""
        picks = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        return [self.ops[k] for k in picks]

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """Augment one RGB image."""
        for name in self.draw(generator):
            if _uniform(generator) < self.prob:
                image = RANDAUGMENT_OPS[name](image, self.magnitude, generator)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, prob={self.prob})"


class CoarseTrainTransform:
    """Coarse-stage fine-tuning transform (docs/reference/training.md §2.1, ``albef_randaug``).

    RandomResizedCrop to ``size x size`` (bicubic) → horizontal flip → :class:`RandAugment` → tensor →
    normalisation. Evaluation uses :class:`~fiber_data.images.transforms.ImageTransform` instead.

    Args:
        size: output side ``S``.
        scale: RandomResizedCrop area range.
        flip_prob: horizontal flip probability (the text is not changed, also for VQA and NLVR2).
        randaugment: the colour/geometry augmentation, ``None`` to disable; ``RandAugment(2, 7)`` by default.
        mean / std: normalisation (ImageNet).
        generator: RNG; ``None`` uses torch's global RNG (seeded per DataLoader worker).

    Call with a PIL image; returns ``FloatTensor [3, S, S]``.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        flip_prob: float = 0.5,
        randaugment: RandAugment | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        use_randaugment: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip_prob = float(flip_prob)
        self.randaugment = (randaugment or RandAugment()) if use_randaugment else None
        self.generator = generator
        self._mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self._std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        """Augment and normalise one image → ``FloatTensor [3, S, S]``."""
        g = self.generator
        if image.mode != "RGB":
            image = image.convert("RGB")
        left, top, w, h = random_resized_crop_params(image.width, image.height, self.scale, generator=g)
        image = image.resize(
            (self.size, self.size), resample=Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)
        )
        if _uniform(g) < self.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image, g)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self._mean) / self._std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, flip_prob={self.flip_prob}, "
            f"randaugment={self.randaugment!r})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Fine stage: boxes ("+1" convention).


def crop_boxes(boxes: Tensor, region: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Boxes after cropping the image to ``region``: shifted, clipped, degenerate ones dropped.

    Args:
        boxes: ``[N, 4]`` xyxy, "+1" convention.
        region: ``(left, top, width, height)`` of the crop in pixels.

    Returns:
        ``(boxes [K, 4], keep [N])``: the kept boxes in crop coordinates, clipped to
        ``[0, width - 1] x [0, height - 1]``, and the boolean mask of kept input boxes (a box is dropped when
        ``x2 <= x1`` or ``y2 <= y1`` after clipping, as in docs/reference/data-formats.md §9.5).
    """
    left, top, width, height = region
    out = boxes.reshape(-1, 4).float() - torch.tensor([left, top, left, top], dtype=torch.float32)
    out[:, 0::2] = out[:, 0::2].clamp(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clamp(0, height - 1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


def pad_boxes(boxes: Tensor, padding: tuple[int, int]) -> Tensor:
    """Boxes after zero-padding an image bottom/right by ``padding = (bottom, right)``: unchanged.

    Bottom/right padding (the grounding collator's) moves no pixel, so the boxes are returned as a float copy;
    the function exists so that pipelines state the step explicitly.

    Args:
        boxes: ``[N, 4]``.
        padding: ``(bottom, right)`` pixels added (must be >= 0).
    """
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return boxes.reshape(-1, 4).float().clone()
