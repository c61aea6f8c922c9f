"""Dataset statistics: sizes, text lengths, class frequencies and boxes per image. Backs ``fiber-data stats``.

Reads the same annotation formats as :mod:`fiber_data.verify` (docs/reference/data-formats.md §2, §3, §6, §8, §9, §11.2)
leniently: statistics are computed over the records that have the fields they need; run ``fiber-data verify``
to find the broken ones. Text lengths are counted in tokens of a given tokenizer (``<s>`` and ``</s>``
included, as the model sees them, no truncation) or, without one, in white-space separated words.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fiber_data.errors import AnnotationError
from fiber_data.io import as_int, read_json
from fiber_data.types import Tokenizer
from fiber_data.verify import FORMATS, VQA_IMAGE_TEMPLATE

__all__ = ["dataset_stats", "format_stats", "summarize"]


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """``count``, ``min``, ``max``, ``mean``, ``p50``, ``p90``, ``p99`` of ``values`` (only ``count`` when empty)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    out: dict[str, float | int] = {"count": int(a.size), "min": float(a.min()), "max": float(a.max())}
    out["mean"] = float(a.mean())
    for q in (50, 90, 99):
        out[f"p{q}"] = float(np.percentile(a, q))
    return out


def _histogram(values: Sequence[int]) -> dict[str, int]:
    counts = Counter(int(v) for v in values)
    return {str(k): counts[k] for k in sorted(counts)}


def _text_lengths(texts: Sequence[str], tokenizer: Tokenizer | None, chunk: int = 256) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        longest = max(len(t.encode("utf-8")) for t in part) + 2  # byte-level BPE never exceeds bytes + 2
        enc = tokenizer(part, max_length=max(longest, 2), padding="longest")
        lengths.extend(int(n) for n in enc.attention_mask.sum(dim=1).tolist())
    return lengths


def _records(data: Any, key: str) -> list[dict[str, Any]]:
    value = data.get(key) if isinstance(data, dict) else None
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise AnnotationError("annotation file not found", file=path)
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def dataset_stats(
    format: str,
    ann_file: str | PathLike[str],
    image_root: str | PathLike[str] | None = None,
    *,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Statistics of one annotation file.

    Args:
        format: one of :data:`fiber_data.verify.FORMATS`.
        ann_file: the annotation file.
        image_root: when given, image sizes are read from the files' headers (no decoding) for images whose
            record does not state them, and missing files are counted.
        tokenizer: count text lengths in its tokens (specials included); ``None`` counts words.

    Returns:
        A JSON-ready dict: ``format``, ``ann_file``, ``num_images``, ``num_texts``, ``text_length``
        (:func:`summarize` + ``unit`` + ``histogram``), ``image_width`` / ``image_height``, and for box formats
        ``num_boxes``, ``boxes_per_image`` (+ ``histogram``), ``class_frequency`` (name → boxes, most frequent
        first); ``missing_images`` when ``image_root`` is given.

    Raises:
        ValueError: unknown format.
        AnnotationError: the file is missing or not parseable.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {sorted(FORMATS)}")
    ann = Path(ann_file)
    root = Path(image_root) if image_root is not None else None
    texts: list[str] = []
    # image key -> (relative file name or None, width or None, height or None)
    images: dict[Any, tuple[str | None, int | None, int | None]] = {}
    boxes_per_image: Counter[Any] | None = None
    class_names: dict[int, str] = {}
    class_counts: Counter[int] = Counter()

    if format == "nlvr2":
        for rec in _read_jsonl(ann):
            if isinstance(rec.get("sentence"), str):
                texts.append(rec["sentence"])
            ident = rec.get("identifier")
            if isinstance(ident, str) and len(ident.split("-")) >= 4:
                stem = "-".join(ident.split("-")[:-1])
                folder = f"{rec['directory']}/" if "directory" in rec else ""
                for side in ("img0", "img1"):
                    images.setdefault(f"{stem}-{side}", (f"{folder}{stem}-{side}.png", None, None))
    else:
        data = read_json(ann)
        if format == "karpathy":
            for rec in _records(data, "images"):
                name = rec.get("filename")
                folder = rec.get("filepath")
                if isinstance(name, str):
                    rel = f"{folder}/{name}" if isinstance(folder, str) else name
                    images[rel] = (rel, None, None)
                for sent in rec.get("sentences", []) if isinstance(rec.get("sentences"), list) else []:
                    if isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                        texts.append(sent["raw"])
        elif format == "vqa-questions":
            subtype = data.get("data_subtype", "") if isinstance(data, dict) else ""
            subtype = subtype.replace("test-dev", "test") if isinstance(subtype, str) else ""
            for q in _records(data, "questions"):
                if isinstance(q.get("question"), str):
                    texts.append(q["question"])
                iid = as_int(q.get("image_id"))
                if iid is not None:
                    images.setdefault(iid, (VQA_IMAGE_TEMPLATE.format(subtype=subtype, image_id=iid), None, None))
        else:
            file_of: dict[int, str] = {}
            for rec in _records(data, "images"):
                iid = as_int(rec.get("id"))
                name = rec.get("file_name")
                if iid is None:
                    continue
                if format == "grounding" and isinstance(rec.get("caption"), str):
                    texts.append(rec["caption"])
                rel = name if isinstance(name, str) else None
                if rel is not None:
                    file_of[iid] = rel
                # Grounding files list an image once per text: count distinct files, not entries.
                key = rel if format == "grounding" and rel is not None else iid
                images.setdefault(key, (rel, as_int(rec.get("width")), as_int(rec.get("height"))))
            if format == "coco-captions":
                texts.extend(a["caption"] for a in _records(data, "annotations") if isinstance(a.get("caption"), str))
            else:
                boxes_per_image = Counter({k: 0 for k in images})
                for cat in _records(data, "categories"):
                    cid = as_int(cat.get("id"))
                    if cid is not None and isinstance(cat.get("name"), str):
                        class_names[cid] = cat["name"]
                for a in _records(data, "annotations"):
                    iid = as_int(a.get("image_id"))
                    if iid is None or a.get("iscrowd", 0):
                        continue
                    key = file_of.get(iid, iid) if format == "grounding" else iid
                    boxes_per_image[key] += 1
                    cid = as_int(a.get("category_id"))
                    if cid is not None:
                        class_counts[cid] += 1

    widths: list[int] = []
    heights: list[int] = []
    missing = 0
    for rel, w, h in images.values():
        if (w is None or h is None) and root is not None and rel is not None:
            try:
                with Image.open(root / rel) as im:  # reads the header only
                    w, h = im.size
            except (OSError, ValueError, SyntaxError):
                missing += 1
        if w is not None and h is not None:
            widths.append(w)
            heights.append(h)

    lengths = _text_lengths(texts, tokenizer) if texts else []
    out: dict[str, Any] = {
        "format": format,
        "ann_file": str(ann),
        "num_images": len(images),
        "num_texts": len(texts),
        "text_length": {"unit": "tokens" if tokenizer is not None else "words", **summarize(lengths)},
        "image_width": summarize(widths),
        "image_height": summarize(heights),
    }
    if lengths:
        out["text_length"]["histogram"] = _histogram(lengths)
    if boxes_per_image is not None:
        per = list(boxes_per_image.values())
        out["num_boxes"] = int(sum(per))
        out["boxes_per_image"] = {**summarize(per), "histogram": _histogram(per)}
        out["class_frequency"] = {
            class_names.get(cid, str(cid)): n for cid, n in sorted(class_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        }
    if root is not None:
        out["missing_images"] = missing
    return out


def format_stats(stats: dict[str, Any], *, top_classes: int = 20) -> str:
    """Human-readable rendering of :func:`dataset_stats` output."""

    def line(name: str, s: dict[str, Any]) -> str:
        if not s.get("count"):
            return f"{name}: none"
        return (
            f"{name}: min {s['min']:g}  mean {s['mean']:.2f}  p50 {s['p50']:g}  p90 {s['p90']:g}  "
            f"p99 {s['p99']:g}  max {s['max']:g}"
        )

    lines = [
        f"{stats['ann_file']} ({stats['format']}): {stats['num_images']} images, {stats['num_texts']} texts",
        line(f"text length ({stats['text_length']['unit']})", stats["text_length"]),
        line("image width", stats["image_width"]),
        line("image height", stats["image_height"]),
    ]
    if "boxes_per_image" in stats:
        lines.append(f"boxes: {stats['num_boxes']}")
        lines.append(line("boxes per image", stats["boxes_per_image"]))
        classes = list(stats["class_frequency"].items())
        shown = ", ".join(f"{name} {n}" for name, n in classes[:top_classes])
        more = f", ... ({len(classes) - top_classes} more)" if len(classes) > top_classes else ""
        lines.append(f"classes ({len(classes)}): {shown}{more}")
    if "missing_images" in stats:
        lines.append(f"missing or unreadable images: {stats['missing_images']}")
    return "\n".join(lines)
