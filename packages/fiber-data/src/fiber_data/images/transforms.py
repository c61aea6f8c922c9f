"""Image loading and the coarse-stage image transform (docs/reference/training.md §1.1).

Pre-training and every evaluation of the coarse stage use the same transform: resize to ``S x S`` (the aspect
ratio is *not* kept) with bicubic interpolation, convert to a float tensor in ``[0, 1]`` and normalise with the
ImageNet mean and standard deviation. Written with PIL and torch only (no torchvision dependency); PIL's
bicubic resize is what ``torchvision.transforms.Resize`` calls on PIL images.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fiber_data.errors import ImageLoadError
from fiber_data.text.left_right import flip_caption, mentions_left_right

__all__ = [
    "BGR255_MEAN",
    "BGR255_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GroundingTransform",
    "ImageTransform",
    "hflip_boxes",
    "load_image",
    "load_image_bytes",
    "resize_boxes",
    "resized_size",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


# What PIL raises on corrupt input: besides OSError/ValueError, its plugins signal a broken file with
# SyntaxError (PNG chunks), EOFError, struct.error, IndexError or TypeError (malformed headers).
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)


_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB; 16-bit (and 32-bit integer) greyscale is scaled to 0..255, not clipped.

    Pillow's ``convert("RGB")`` clips a 16-bit greyscale PNG (mode ``I;16``/``I``) at 255, which turns almost
    every pixel white; here values are divided by 257 (65535 -> 255). Mode ``I`` images whose values all fit
    in 0..255 are kept as they are.
    """
    if im.mode not in _WIDE_GREY_MODES:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.int64)
    if im.mode != "I" or values.max(initial=0) > 255:
        values = (values.clip(0, 65535) + 128) // 257
    return Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB")


def load_image(path: str | PathLike[str], *, record: str | int | None = None) -> Image.Image:
    """Open an image file and convert it to RGB, fully decoded.

    Args:
        path: image file.
        record: the annotation record that refers to the image, reported in errors.

    Returns:
        An RGB ``PIL.Image.Image``.

    Raises:
        ImageLoadError: the file is missing, unreadable, truncated or not an image; the error names the file
            and the record.
    """
    p = Path(path)
    try:
        found = p.is_file()
    except OSError as exc:  # e.g. ENAMETOOLONG from a garbage file name
        raise ImageLoadError(f"bad image path ({exc.strerror})", file=p, record=record) from exc
    if not found:
        raise ImageLoadError("image file not found", file=p, record=record)
    try:
        with Image.open(p) as im:
            im.load()  # decode now so truncated files fail here, not later in a worker
            return to_rgb(im)
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot decode image ({type(exc).__name__}: {exc})", file=p, record=record) from exc


def load_image_bytes(data: bytes, *, source: str | None = None, record: str | int | None = None) -> Image.Image:
    """Decode an encoded image (JPEG/PNG bytes, e.g. from an Arrow table or a tar shard) to RGB.

    Args:
        data: the encoded bytes.
        source: the file the bytes came from, reported in errors.
        record: the row / key of the bytes in ``source``, reported in errors.

    Returns:
        An RGB ``PIL.Image.Image``.

    Raises:
        ImageLoadError: the bytes are not a decodable image.
    """
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"cannot decode image bytes ({type(exc).__name__}: {exc})", file=source, record=record
        ) from exc


class ImageTransform:
    """Resize to ``size x size``, convert to a float tensor and normalise (docs/reference/training.md §1.1).

    Args:
        size: output side ``S`` in pixels (384 in pre-training).
        mean: per-channel mean subtracted after scaling to ``[0, 1]``; ImageNet by default.
        std: per-channel standard deviation; ImageNet by default.
        interpolation: ``"bicubic"`` (reference), ``"bilinear"`` or ``"nearest"``.

    Call with a PIL image (any mode; converted to RGB) and get a ``FloatTensor [3, S, S]``.
    """

    #: the ``interpolation`` values this transform implements
    interpolations: tuple[str, ...] = tuple(_INTERPOLATIONS)

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need three values (R, G, B)")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        if interpolation not in self.interpolations:
            *rest, last = self.interpolations
            raise ValueError(
                f"{type(self).__name__}: interpolation must be {', '.join(rest)} or {last}, got {interpolation!r}"
            )
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        """Transform one image.

        Args:
            image: a PIL image.

        Returns:
            ``FloatTensor [3, S, S]``, normalised.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=_INTERPOLATIONS[self.interpolation])
        array = np.asarray(image, dtype=np.uint8)  # [S, S, 3]
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self._mean) / self._std

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Fine-grained stage (docs/reference/training.md §3.9): multi-scale resize keeping the aspect ratio, horizontal flip with the
# "+1" box convention (docs/reference/data-formats.md §12), BGR x 255 normalisation.

#: Fine-stage normalisation, applied to BGR values in [0, 255].
BGR255_MEAN: tuple[float, float, float] = (103.530, 116.280, 123.675)
BGR255_STD: tuple[float, float, float] = (57.375, 57.120, 58.395)


def resized_size(width: int, height: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(width, height)`` of the fine-stage resize (docs/reference/training.md §3.9).

    The shorter side becomes ``short_side`` unless the longer side would exceed ``max_size``, in which case the
    shorter side becomes ``round(max_size * short / long)``; the other side is ``int(side * long / short)``
    (truncated), keeping the aspect ratio.

    Args:
        width, height: input size.
        short_side: wanted shorter side.
        max_size: cap on the longer side, or ``None``.
    """
    short, long = (width, height) if width <= height else (height, width)
    size = short_side
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_boxes(boxes: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Scale xyxy boxes from ``old_size`` to ``new_size`` (both ``(width, height)``); no ±1 (§12).

    Args:
        boxes: ``[N, 4]``.

    Returns:
        ``FloatTensor [N, 4]``.
    """
    rw = new_size[0] / old_size[0]
    rh = new_size[1] / old_size[1]
    return boxes.float() * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes in an image of ``width`` pixels with the "+1" rule ``x1' = W - x2 - 1``.

    Args:
        boxes: ``[N, 4]``.

    Returns:
        ``FloatTensor [N, 4]``.
    """
    out = boxes.float().clone()
    out[:, 0] = width - boxes[:, 2] - 1
    out[:, 2] = width - boxes[:, 0] - 1
    return out


class GroundingTransform:
    """Fine-stage image + box transform (docs/reference/training.md §3.9).

    Training: shorter side drawn uniformly from ``min_sizes`` (longer side capped at ``max_size``), bilinear
    resize, horizontal flip with probability ``flip_prob`` (captions are *not* changed, as in the reference),
    then RGB → BGR, × 255, normalise with :data:`BGR255_MEAN` / :data:`BGR255_STD`. Test (``train=False``):
    the last of ``min_sizes`` (800 with the defaults; pass ``min_sizes=(800,)`` to be explicit), no flip.

    Args:
        min_sizes: candidate shorter sides.
        max_size: cap on the longer side.
        flip_prob: horizontal flip probability (0 for RefCOCO).
        train: random size and flip (``False`` = deterministic test transform).
        bgr255: use the BGR × 255 normalisation; ``False`` uses RGB in ``[0, 1]`` with ``mean``/``std``.
        mean / std: normalisation constants (in the units selected by ``bgr255``).
        flip_text: what a flip does to the caption, used by :meth:`transform_sample`: ``"keep"`` leaves it
            unchanged (the reference, so "left"/"right" become wrong), ``"swap"`` swaps the words "left" and
            "right" and moves the spans (:func:`~fiber_data.text.left_right.flip_caption`), ``"skip"`` does not flip
            samples whose caption says "left" or "right".

    Call as ``transform(image, boxes, generator=None) -> (FloatTensor [3, H, W], FloatTensor [N, 4])``, or
    :meth:`transform_sample` to also get the (possibly flipped) caption and spans.
    """

    def __init__(
        self,
        min_sizes: Sequence[int] = (480, 560, 640, 720, 800),
        max_size: int | None = 1333,
        flip_prob: float = 0.5,
        *,
        train: bool = True,
        bgr255: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        flip_text: Literal["keep", "swap", "skip"] = "keep",
    ) -> None:
        if flip_text not in ("keep", "swap", "skip"):
            raise ValueError(f"flip_text must be 'keep', 'swap' or 'skip', got {flip_text!r}")
        self.flip_text = flip_text
        if not min_sizes or any(s <= 0 for s in min_sizes):
            raise ValueError(f"min_sizes must be positive, got {tuple(min_sizes)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = max_size
        self.flip_prob = float(flip_prob)
        self.train = train
        self.bgr255 = bgr255
        mean = mean if mean is not None else (BGR255_MEAN if bgr255 else IMAGENET_MEAN)
        std = std if std is not None else (BGR255_STD if bgr255 else IMAGENET_STD)
        self._mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self._std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def __call__(
        self, image: Image.Image, boxes: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Transform an image and its xyxy boxes.

        Args:
            image: PIL image.
            boxes: ``[N, 4]`` xyxy ("+1" convention) in the image's pixels.
            generator: RNG for the size and flip draws.

        Returns:
            ``(pixels [3, H, W], boxes [N, 4])``.
        """
        pixels, boxes, _ = self._apply(image, boxes, generator, may_flip=True)
        return pixels, boxes

    def transform_sample(
        self,
        image: Image.Image,
        boxes: Tensor,
        caption: str,
        spans: Sequence[Sequence[tuple[int, int]]],
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, str, tuple[tuple[tuple[int, int], ...], ...]]:
        """Transform an image, its boxes and, on a flip, its caption according to ``flip_text``.

        Args:
            image: PIL image.
            boxes: ``[N, 4]`` xyxy ("+1" convention).
            caption: the text.
            spans: per box, its ``[start, end)`` character spans in ``caption``.
            generator: RNG for the size and flip draws.

        Returns:
            ``(pixels [3, H, W], boxes [N, 4], caption, spans)``.
        """
        may_flip = not (self.flip_text == "skip" and mentions_left_right(caption))
        pixels, boxes, flipped = self._apply(image, boxes, generator, may_flip=may_flip)
        out_spans = tuple(tuple((int(s), int(e)) for s, e in box) for box in spans)
        if flipped and self.flip_text == "swap":
            caption, out_spans = flip_caption(caption, out_spans)
        return pixels, boxes, caption, out_spans

    def _apply(
        self, image: Image.Image, boxes: Tensor, generator: torch.Generator | None, *, may_flip: bool
    ) -> tuple[Tensor, Tensor, bool]:
        """Resize, maybe flip, normalise; returns ``(pixels, boxes, flipped)``."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.train:
            pick = int(torch.randint(len(self.min_sizes), (1,), generator=generator))
            short = self.min_sizes[pick]
        else:
            short = self.min_sizes[-1]
        new_size = resized_size(image.width, image.height, short, self.max_size)
        boxes = boxes.reshape(-1, 4).float()
        if new_size != image.size:
            boxes = resize_boxes(boxes, image.size, new_size)
            image = image.resize(new_size, resample=Image.Resampling.BILINEAR)
        flipped = False
        if self.train and self.flip_prob > 0 and float(torch.rand((), generator=generator)) < self.flip_prob:
            # The coin is drawn even when the flip is vetoed, so the RNG stream does not depend on the caption.
            flipped = may_flip
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = hflip_boxes(boxes, image.width)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        if self.bgr255:
            pixels = pixels.flip(0)  # RGB -> BGR, values stay in [0, 255]
        else:
            pixels = pixels / 255.0
        return (pixels - self._mean) / self._std, boxes, flipped
