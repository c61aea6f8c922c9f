"""WebDataset-format tar shards of image-text pairs: writer and streaming reader.

A shard is a plain tar file in which the files of one sample are adjacent and share a key (the path up to the
first ``.`` of the file name): ``000123.jpg`` + ``000123.txt`` (+ ``000123.json``). This module reads and
writes that layout with the standard library's ``tarfile``, so it needs no extra dependency; the
``webdataset`` package reads the same shards if its pipeline features are wanted.

:class:`TarImageTextDataset` is an ``IterableDataset`` that splits the shard list across distributed ranks and
DataLoader workers, optionally shuffles shard order per epoch, and decodes each sample to an
:class:`~fiber_data.types.ImageTextSample` (``index = -1``: streamed samples cannot be fetched again).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Literal

from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from fiber_data.errors import DataError, ImageLoadError
from fiber_data.images.transforms import load_image_bytes
from fiber_data.sampling import EpochSeeded, check_rank
from fiber_data.types import ImageTextSample

__all__ = ["TarImageTextDataset", "expand_shards", "iter_tar_members", "iter_tar_samples", "write_tar_shards"]

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
#: largest member a shard may hold (a compressed shard can otherwise expand without bound in memory)
MAX_MEMBER_BYTES = 256 * 2**20
#: largest sum of the members of one sample (the reader holds one sample in memory at a time)
MAX_SAMPLE_BYTES = 256 * 2**20
#: decompressed bytes a shard may hold in total: this many times its size on disk (real image-text shards,
#: JPEG and short text, compress far less than 100x; a decompression bomb expands thousands of times) ...
MAX_EXPANSION_RATIO = 100
#: ... but never less than this (tiny shards of text) nor more than MAX_SHARD_BYTES
MIN_SHARD_LIMIT_BYTES = 256 * 2**20
MAX_SHARD_BYTES = 64 * 2**30


def shard_size_limit(path: str | PathLike[str]) -> int:
    """Total decompressed bytes that :func:`iter_tar_samples` reads from the shard at ``path`` before refusing it.

    ``MAX_EXPANSION_RATIO`` times the file size, clamped to ``[MIN_SHARD_LIMIT_BYTES, MAX_SHARD_BYTES]``.
    """
    size = Path(path).stat().st_size
    return max(MIN_SHARD_LIMIT_BYTES, min(MAX_SHARD_BYTES, MAX_EXPANSION_RATIO * size))


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Expand ``"shards/{000..009}.tar"`` brace ranges (zero padding kept); lists are expanded item-wise."""
    if not isinstance(pattern, str):
        return [s for p in pattern for s in expand_shards(p)]
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_shards(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
    return out


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.jpg"`` → ``("dir/000123", "seg.jpg")``."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _safe_member_name(name: str) -> str:
    """``name`` if it is a relative path that stays inside the archive's folder when extracted.

    Raises:
        ValueError: an absolute path, a ``..`` component, a backslash, or a control character (``tar x``
            would write such a member outside the target directory or under a surprising name).
    """
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(c) < 32 for c in name)
    ):
        raise ValueError(f"unsafe tar member name {name!r}: keys must be relative paths without '..'")
    return name


def iter_tar_samples(path: str | PathLike[str]) -> Iterator[dict[str, bytes | str]]:
    """Yield the samples of one shard as ``{"__key__", "__url__", <ext>: bytes, ...}``.

    Members are read into memory, never extracted: member names (even ``../x`` or absolute ones) only form
    sample keys, and links, devices and directories are skipped, so a hostile shard cannot write or read
    files outside itself.

    Raises:
        DataError: the shard is missing or not a readable tar file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("tar shard not found", file=p)
    try:
        with tarfile.open(p, "r:*") as tar:
            yield from iter_tar_members(tar, p, max_member_bytes=MAX_MEMBER_BYTES, max_total_bytes=shard_size_limit(p))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # OSError/EOFError/zlib: broken .tar.gz
        raise DataError(f"unreadable tar shard ({type(exc).__name__}: {exc})", file=p) from exc


def iter_tar_members(
    tar: tarfile.TarFile,
    source: str | PathLike[str],
    *,
    max_member_bytes: int,
    max_total_bytes: int | None = None,
) -> Iterator[dict[str, bytes | str]]:
    """Group the members of an open tar (a file or a stream, read in order) into samples
    ``{"__key__", "__url__": source, <ext>: bytes}``, under the safety limits every shard reader applies: links,
    devices and directories are skipped unread, members are read into memory (never extracted), and a member
    over ``max_member_bytes``, a sample over ``MAX_SAMPLE_BYTES`` or (when given) a shard over
    ``max_total_bytes`` decompressed is a :class:`~fiber_data.errors.DataError` naming ``source`` and the key.
    """
    current: dict[str, bytes | str] = {}
    total = 0  # decompressed member bytes read from this shard
    sample_bytes = 0
    for member in tar:
        # do not keep every member's header in memory (one sample at a time); undocumented, not in typeshed
        tar.members = []  # pyright: ignore[reportAttributeAccessIssue]
        if not member.isfile():  # links, devices, directories: never followed or read
            continue
        key, ext = _split_name(member.name)
        if current and current["__key__"] != key:
            yield current
            current = {}
        if not current:
            current = {"__key__": key, "__url__": str(source)}
            sample_bytes = 0
        if member.size > max_member_bytes:
            raise DataError(
                f"member {member.name!r} declares {member.size} bytes (limit {max_member_bytes})",
                file=source,
                record=key,
            )
        total += member.size
        sample_bytes += member.size
        if sample_bytes > MAX_SAMPLE_BYTES:
            raise DataError(
                f"the members of sample {key!r} hold more than {MAX_SAMPLE_BYTES} bytes (limit "
                "MAX_SAMPLE_BYTES); split the sample or check the shard",
                file=source,
                record=key,
            )
        if max_total_bytes is not None and total > max_total_bytes:
            raise DataError(
                f"the shard expands to more than {max_total_bytes} bytes, {MAX_EXPANSION_RATIO}x its size on disk "
                "(a decompression bomb?); refusing to read further (limits: fiber_data.formats.tar."
                "MAX_EXPANSION_RATIO, MAX_SHARD_BYTES)",
                file=source,
                record=key,
            )
        handle = tar.extractfile(member)
        if handle is not None:
            current[ext] = handle.read()
    if current:
        yield current


def write_tar_shards(
    samples: Iterable[Mapping[str, bytes | str]],
    pattern: str | PathLike[str],
    *,
    max_count: int = 10000,
) -> list[Path]:
    """Write samples (``{"__key__": str, "<ext>": bytes | str, ...}``) into shards of ``max_count`` samples.

    Args:
        samples: the samples; ``str`` values are UTF-8 encoded, dict/list values written as JSON.
        pattern: ``%``-format path with one integer field, e.g. ``"out/shard-%06d.tar"``.
        max_count: samples per shard.

    Returns:
        The shard paths written.

    Raises:
        ValueError: a key is not a safe relative member name (absolute, ``..``, control characters).
    """
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    count = 0
    try:
        for sample in samples:
            if tar is None or count >= max_count:
                if tar is not None:
                    tar.close()
                path = Path(str(pattern) % len(paths))
                path.parent.mkdir(parents=True, exist_ok=True)
                paths.append(path)
                tar = tarfile.open(path, "w")  # noqa: SIM115 - spans loop iterations, closed below
                count = 0
            key = _safe_member_name(str(sample["__key__"]))
            for ext, value in sample.items():
                if ext.startswith("__"):
                    continue
                if isinstance(value, (dict, list)):
                    data = json.dumps(value).encode("utf-8")
                elif isinstance(value, str):
                    data = value.encode("utf-8")
                else:
                    data = bytes(value)
                info = tarfile.TarInfo(_safe_member_name(f"{key}.{ext}"))
                info.size = len(data)
                info.mtime = 0  # reproducible shards
                tar.addfile(info, io.BytesIO(data))
            count += 1
    finally:
        if tar is not None:
            tar.close()
    return paths


class TarImageTextDataset(EpochSeeded, IterableDataset[ImageTextSample]):
    """Stream (image, caption) pairs from WebDataset-format shards.

    Args:
        shards: shard paths or brace patterns (see :func:`expand_shards`).
        transform: PIL image → ``FloatTensor [3, H, W]``.
        image_keys: extensions tried for the image, in order.
        text_keys: extensions tried for the caption (``txt``), in order; a ``json`` member with a ``caption``
            field is used when none is present.
        shuffle_shards: shuffle the shard order with ``seed + epoch`` (call :meth:`set_epoch`).
        seed: shuffle seed.
        rank / world_size: distributed split of the shard list (shard ``i`` goes to rank ``i % world_size``).
        on_error: ``"raise"`` or ``"skip"`` samples that lack an image/caption or fail to decode.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Callable[[Image.Image], Tensor],
        *,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        text_keys: Sequence[str] = ("txt", "caption"),
        shuffle_shards: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("no shards given")
        check_rank(rank, world_size)
        self.transform = transform
        self.image_keys = tuple(image_keys)
        self.text_keys = tuple(text_keys)
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.on_error = on_error

    def my_shards(self) -> list[str]:
        """Shards this rank and DataLoader worker read, in order."""
        order = list(self.shards)
        if self.shuffle_shards:
            perm = self.epoch_rng().permutation(len(order))
            order = [order[i] for i in perm]
        order = order[self.rank :: self.world_size]
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        return order

    def _decode(self, raw: Mapping[str, bytes | str]) -> ImageTextSample:
        key, url = str(raw["__key__"]), str(raw["__url__"])
        image_bytes = next((raw[k] for k in self.image_keys if k in raw), None)
        if not isinstance(image_bytes, bytes):
            raise ImageLoadError(f"no image member ({', '.join(self.image_keys)})", file=url, record=key)
        caption = next((raw[k] for k in self.text_keys if k in raw), None)
        if caption is None and "json" in raw:
            try:
                caption = json.loads(raw["json"]).get("caption")
            except (ValueError, AttributeError, RecursionError):  # ValueError covers bad JSON and bad UTF-8
                caption = None
            if not isinstance(caption, str):
                caption = None
        if caption is None:
            raise DataError(f"no caption member ({', '.join(self.text_keys)} or json 'caption')", file=url, record=key)
        try:
            text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError as exc:
            raise DataError(f"caption is not UTF-8 text ({exc.reason})", file=url, record=key) from exc
        image = load_image_bytes(image_bytes, source=url, record=key)
        return ImageTextSample(image_id=key, image=self.transform(image), caption=text.strip(), index=-1)

    def __iter__(self) -> Iterator[ImageTextSample]:
        for shard in self.my_shards():
            for raw in iter_tar_samples(shard):
                try:
                    yield self._decode(raw)
                except DataError:
                    if self.on_error == "raise":
                        raise
