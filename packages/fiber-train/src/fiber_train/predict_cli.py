"""``fiber-train predict``: run a trained model on image files and write JSON (and box drawings).

The command-line face of the task backends (:mod:`fiber_models.backends`, shared with the demo): phrase grounding and
detection with class names (docs/reference/training.md §4.7, through :class:`fiber_models.predictor.GroundingPredictor`, one
batched forward per ``--batch-size`` images), VQA (docs/reference/training.md §2.3), captioning (docs/reference/training.md §2.6) and image-text
scoring (docs/reference/training.md §1). Models are loaded exactly as the demo loads them (:func:`~fiber_models.backends.load_backends`); nothing of
the trainer or the demo is imported.

Outputs, in ``--out``:

* ``<stem>.json`` per image: ``{"file", "task", "model", "image": {"width", "height"}, ...}`` plus the task's result
  (grounding/detection: ``boxes`` = ``[{"box": [x0, y0, x1, y1], "score", "label", "phrase"}]`` in original-image
  pixels, best first, and ``label_names``; VQA: ``answers``; caption: ``caption``; scoring: ``captions``).
* ``<stem>.png`` per image for grounding/detection: the image with the best boxes and their labels drawn.
* ``predictions.json``: the settings, every per-image record and the ``skipped`` images (with ``--skip-bad``).

Example::

    fiber-train predict --checkpoint runs/fine-20261125-010000 --task detection \\
        --text "red circle, blue square" photos/ --out preds/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "DESCRIPTION",
    "IMAGE_SUFFIXES",
    "PredictError",
    "add_arguments",
    "build_parser",
    "DRAW_MIN_SIDE",
    "draw_boxes",
    "drawing_scale",
    "find_images",
    "main",
    "run",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""File suffixes collected from input folders (case-insensitive). Files named explicitly are always read."""

TASKS: tuple[str, ...] = ("grounding", "detection", "vqa", "caption", "scoring")

DESCRIPTION = """\
Run a trained FIBER model on images and write one JSON file per image plus predictions.json.

Tasks (the checkpoint must have the matching head):
  grounding  boxes for a caption; mark several phrases with brackets: "[a red circle] left of [a blue square]"
             (a `fiber-train fine` run; the best box per phrase is the referring-expression answer)
  detection  boxes for class names separated by commas: "red circle, blue square" (a `fiber-train fine` run)
  vqa        answers to the question in --text (a `fiber-train finetune vqa` run)
  caption    a beam-search caption; --text is ignored (a `fiber-train finetune caption` run)
  scoring    ITM probability and ITC cosine of each caption (one per line of --text; a `fiber-train coarse` run)

INPUT: image files and/or folders (searched recursively for .jpg .jpeg .png .webp .bmp).
Grounding and detection also write <stem>.png with the boxes drawn (an image under 384 px is drawn on a
canvas upscaled by a whole factor, so that the labels fit).

Example:
  fiber-train predict --checkpoint runs/fine-20261125-010000 --task grounding --text "the red circle" \\
      photos/ --out preds/
"""


class PredictError(ValueError):
    """Bad command-line input: no images, an unreadable image, a checkpoint without the task's head."""


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fiber-train predict`` (stand-alone)."""
    p = argparse.ArgumentParser(
        prog="fiber-train predict", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return p


def _pad_to(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH (e.g. 800x1344), got {value!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--pad-to sides must be positive, got {value!r}")
    return h, w


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``fiber-train predict`` to ``p`` (the ``predict`` sub-parser, or a stand-alone parser)."""
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument(
        "--checkpoint", required=True, metavar="RUN_DIR", help="a finished run directory (or its model/ folder)"
    )
    p.add_argument("--task", required=True, choices=TASKS, help="what to predict (see above)")
    p.add_argument("--text", default="", help="caption / class names / question / captions, depending on --task")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward (grounding/detection; 8)")
    p.add_argument("--device", default="cpu", help="inference device (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--pad-to",
        type=_pad_to,
        metavar="HxW",
        help="pad every grounding/detection batch to this size, so that results do not depend on the batch",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="SCORE",
        help="class-score threshold of box candidates (default: 0.05 for detection, 0 for grounding)",
    )
    p.add_argument("--max-draw", type=_positive_int, default=5, help="boxes drawn per image in <stem>.png (5)")
    p.add_argument("--min-score", type=float, default=0.0, help="smallest score of a drawn box (0)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="list unreadable images under 'skipped' in predictions.json instead of stopping",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------ inputs


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively for :data:`IMAGE_SUFFIXES`.

    Folder contents are sorted by path; hidden files and folders (``.name``) are skipped; duplicates are dropped.

    Raises:
        FileNotFoundError: an input does not exist.
        PredictError: no image was found.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.exists():
            files = [p]
        else:
            raise FileNotFoundError(f"input {p}: no such file or directory")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        names = ", ".join(str(i) for i in inputs)
        raise PredictError(f"no images found in {names} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _output_stems(files: Sequence[Path], out: Path) -> list[str]:
    """A unique output stem per input (``name``, then ``name-1``, ``name-2`` ... on collisions)."""
    used: set[str] = {"predictions"}
    stems: list[str] = []
    inputs = {f.resolve() for f in files}
    for f in files:
        stem, k = f.stem, 0
        while stem in used:
            k += 1
            stem = f"{f.stem}-{k}"
        used.add(stem)
        for ext in (".json", ".png"):
            if (out / f"{stem}{ext}").resolve() in inputs:
                raise PredictError(
                    f"--out {out}: writing {stem}{ext} would overwrite the input image {out / stem}{ext}"
                )
        stems.append(stem)
    return stems


# --------------------------------------------------------------------------------------------- drawing

_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


#: images whose longer side is shorter are drawn on a canvas upscaled by a whole factor (as the demo page shows
#: them), so that labels in the default font fit and stay readable
DRAW_MIN_SIDE = 384


def drawing_scale(size: tuple[int, int], min_side: int = DRAW_MIN_SIDE) -> int:
    """The whole factor by which an image of ``size = (W, H)`` is upscaled for drawing: the smallest ``k >= 1``
    with ``k * max(W, H) >= min_side`` (1 when ``min_side <= 0``)."""
    longer = max(size)
    if min_side <= 0 or longer >= min_side or longer < 1:
        return 1
    return -(-min_side // longer)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    texts: Sequence[str],
    *,
    width: int | None = None,
    min_side: int = 0,
) -> Image.Image:
    """Draw boxes with a text label each on a copy of ``image``.

    Box ``i`` is a rectangle outline from ``(x0, y0)`` to ``(x1, y1)`` (both corners drawn, the "+1" convention of
    the predictions) in the colour of ``labels[i]``; its text sits on a filled strip just above the box (inside it
    when the box touches the top edge), moved left to stay inside the image and down past the strips already
    placed, so labels neither get cut at the border nor cover each other. The first box is drawn with a doubled
    line width (the best box).

    Args:
        image: the original image (any mode; drawn on as RGB).
        boxes: ``[D, 4]`` xyxy boxes in image pixels (rounded to whole pixels and clipped to the image).
        labels: ``D`` label indices (pick the colour).
        texts: ``D`` label texts.
        width: line width in pixels of the drawing (default: ``max(1, min(W, H) // 200)`` of the drawing).
        min_side: when the longer side is below it, draw on the image upscaled (nearest neighbour) by the whole
            factor :func:`drawing_scale`, boxes scaled alike (``fiber-train predict`` uses
            :data:`DRAW_MIN_SIDE`); 0 keeps the size.

    Returns:
        A new RGB image, ``k`` times the size of ``image`` (``k = drawing_scale(image.size, min_side)``).
    """
    k = drawing_scale(image.size, min_side)
    out = image.convert("RGB")  # always a copy
    if k > 1:
        out = out.resize((out.width * k, out.height * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    w, h = out.size
    base = width if width is not None else max(1, min(w, h) // 200)
    rects: list[tuple[int, int, int, int]] = []
    for b in boxes:
        # scale (pixel (x, y) covers [k x, k x + k - 1] on the canvas), round to whole pixels, clip to the image
        x0, y0, x1, y1 = (round(float(v)) for v in b)
        x0, y0, x1, y1 = x0 * k, y0 * k, x1 * k + k - 1, y1 * k + k - 1
        rects.append((min(max(x0, 0), w - 1), min(max(y0, 0), h - 1), min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)))
    # label strips, placed best box first: above the box, inside the canvas, below strips already placed
    strips: list[tuple[float, float, float, float, float, float] | None] = []  # textbbox gives floats
    placed: list[tuple[float, float, float, float]] = []
    for (x0, y0, _, _), text in zip(rects, texts):
        if not text:
            strips.append(None)
            continue
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 2, ty1 - ty0 + 2
        left = max(0, min(x0, w - tw))
        top = y0 - th if y0 - th >= 0 else y0
        for _ in range(len(placed)):  # one move per strip at most
            hit = [r for r in placed if left < r[2] and r[0] < left + tw and top < r[3] and r[1] < top + th]
            if not hit:
                break
            top = max(r[3] for r in hit)
        top = max(0, min(top, h - th))
        placed.append((left, top, left + tw, top + th))
        strips.append((left, top, tw, th, tx0, ty0))
    # draw the best box last so that it is on top
    for i in reversed(range(len(rects))):
        x0, y0, x1, y1 = rects[i]
        color = _COLORS[int(labels[i]) % len(_COLORS)]
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=color, width=base * 2 if i == 0 else base)
        strip = strips[i]
        if strip is not None:
            left, top, tw, th, tx0, ty0 = strip
            draw.rectangle((left, top, left + tw, top + th), fill=color)
            draw.text((left + 1 - tx0, top + 1 - ty0), texts[i], fill=(255, 255, 255), font=font)
    return out


# ------------------------------------------------------------------------------------------- inference


def _round(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


def _load_backend(checkpoint: str, task: str, device: str) -> tuple[Any, Any]:
    """The demo backend set of ``checkpoint`` and its backend for ``task``.

    Raises:
        PredictError: the checkpoint has no head for ``task`` (or failed to load).
    """
    from fiber_models.backends import load_backends

    backends = load_backends([checkpoint], device=device)
    backend = backends.backends[task]
    if not backend.available:
        raise PredictError(
            f"--checkpoint {checkpoint}: task {task!r} is not available in this run: {getattr(backend, 'reason', '')}"
        )
    return backends, backend


def _progress(total: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="img", disable=disable or total < 2, file=sys.stderr)


def _load(path: Path, skip_bad: bool, skipped: list[dict[str, str]]) -> Image.Image | None:
    from fiber_data import ImageLoadError, load_image

    try:
        return load_image(path)
    except ImageLoadError as exc:
        if not skip_bad:
            raise PredictError(f"{exc} (pass --skip-bad to skip unreadable images)") from exc
        skipped.append({"file": str(path), "error": exc.message})
        return None


def _grounding_query(task: str, text: str) -> Any:
    from fiber_data import Prompt
    from fiber_models.backends import parse_class_names, parse_phrases

    if task == "detection":
        return parse_class_names(text)
    caption, spans = parse_phrases(text)
    return Prompt(caption, tuple(range(len(spans))), dict(enumerate(spans)))


def _grounding_records(backend: Any, images: list[Image.Image], query: Any) -> list[dict[str, Any]]:
    """One batched forward of the backend's predictor; the demo's result layout per image."""
    preds = backend.predictor.predict(images, [query] * len(images), config=backend.postprocess)
    cfg = backend.postprocess
    records = []
    for pred in preds:
        boxes = [
            {"box": [_round(v, 2) for v in b], "score": _round(s), "label": int(lab), "phrase": phrase}
            for b, s, lab, phrase in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), pred.phrases)
        ]
        records.append(
            {
                "boxes": boxes,
                "label_names": list(pred.label_names),
                "query": query.caption if hasattr(query, "caption") else list(query),
                "postprocess": {"pre_nms_thresh": cfg.pre_nms_thresh, "nms_thresh": cfg.nms_thresh},
            }
        )
    return records


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Run ``fiber-train predict`` from parsed arguments (see :func:`add_arguments`).

    Returns:
        0 on success; 2 on bad input (no images, an unreadable image without ``--skip-bad``, a checkpoint without
        the task's head, empty text), with the error on stderr.
    """
    from fiber_models import ModelFormatError
    from fiber_models.backends import DemoInputError

    try:
        return _run(args)
    except (PredictError, DemoInputError, ModelFormatError, FileNotFoundError, OSError) as exc:
        print(f"fiber-train predict: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    files = find_images(args.inputs)
    out = Path(args.out).expanduser()
    stems = _output_stems(files, out)
    grounding = args.task in ("grounding", "detection")
    # check the text before loading a model
    if args.task != "caption" and not args.text.strip():
        raise PredictError(f"--task {args.task} needs --text")
    query = _grounding_query(args.task, args.text) if grounding else None
    backends, backend = _load_backend(args.checkpoint, args.task, args.device)
    if grounding and args.pad_to is not None:
        backend.predictor.pad_to = tuple(args.pad_to)
    if grounding and args.threshold is not None:
        backend.postprocess = dataclasses.replace(backend.postprocess, pre_nms_thresh=float(args.threshold))
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    step = args.batch_size if grounding else 1
    with _progress(len(files), args.no_progress) as bar:
        for b in range(0, len(files), step):
            batch = list(zip(files[b : b + step], stems[b : b + step]))
            loaded = [(f, s, _load(f, args.skip_bad, skipped)) for f, s in batch]
            ok = [(f, s, im) for f, s, im in loaded if im is not None]
            if not ok:
                bar.update(len(batch))
                continue
            if grounding:
                t0 = time.perf_counter()
                try:
                    results = _grounding_records(backend, [im for _, _, im in ok], query)
                except ValueError as exc:  # e.g. --pad-to smaller than a resized image, a phrase beyond the budget
                    names = ", ".join(str(f) for f, _, _ in ok)
                    raise PredictError(f"batch of {names}: {exc}") from exc
                per_image = (time.perf_counter() - t0) / len(ok)
                results = [
                    {"task": args.task, "model": backend.source, "seconds": _round(per_image, 3), **r} for r in results
                ]
            else:
                results = [backends.run(args.task, im, args.text) for _, _, im in ok]
            for (f, stem, im), res in zip(ok, results):
                res.pop("image", None)
                record = {"file": str(f), "output": f"{stem}.json", "image": {"width": im.width, "height": im.height}}
                record.update(res)
                if grounding:
                    shown = [x for x in record["boxes"] if x["score"] >= args.min_score][: args.max_draw]
                    drawn = draw_boxes(
                        im,
                        [x["box"] for x in shown],
                        [x["label"] for x in shown],
                        [f"{x['phrase']} {x['score']:.2f}" for x in shown],
                        min_side=DRAW_MIN_SIDE,
                    )
                    drawn.save(out / f"{stem}.png")
                    record["drawing"] = f"{stem}.png"
                _write_json(out / f"{stem}.json", record)
                records.append(record)
            bar.update(len(batch))

    summary = {
        "task": args.task,
        "checkpoint": str(args.checkpoint),
        "model": backend.source,
        "text": args.text,
        "num_images": len(records),
        "seconds": _round(time.perf_counter() - start, 3),
        "predictions": records,
        "skipped": skipped,
    }
    _write_json(out / "predictions.json", summary)
    note = f" ({len(skipped)} unreadable skipped)" if skipped else ""
    print(f"{args.task}: {len(records)} images{note} -> {out / 'predictions.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the stand-alone ``fiber-train predict`` parser; returns the exit code."""
    return run(build_parser().parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    raise SystemExit(main())
