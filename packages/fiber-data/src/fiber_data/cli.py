"""The ``fiber-data`` command line: generate the synthetic world, verify datasets, train a tokenizer.

Subcommands::

    fiber-data synth --out DIR [--size N | --num-train N --num-val N --num-test N] [--seed S --image-size S ...]
    fiber-data verify --format coco-captions|coco-detection|grounding|karpathy|nlvr2|vqa-questions \
        --ann FILE --images DIR
    fiber-data verify DIR --format F [--images DIR]     # every F annotation file of a dataset directory
    fiber-data stats --format F --ann FILE [--images DIR] [--tokenizer PATH] [--json]
    fiber-data train-tokenizer --ann FILE [--format ...] --vocab-size N --out tokenizer.json

``main(argv)`` returns the exit code (0 success, 1 problems found, 2 usage error) so tests can drive it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fiber_data.errors import DataError
from fiber_data.synthetic import SyntheticWorldConfig, generate_world, load_world_manifest
from fiber_data.verify import FORMATS, discover_datasets, verify_annotations

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fiber-data``."""
    parser = argparse.ArgumentParser(prog="fiber-data", description="FIBER data tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = SyntheticWorldConfig()
    synth = sub.add_parser("synth", help="generate the seeded synthetic world of coloured shapes")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--seed", type=int, default=d.seed)
    synth.add_argument("--image-size", type=int, default=d.image_size)
    synth.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"train images; val and test get a tenth each (default {d.num_train}/{d.num_val}/{d.num_test}); "
        "--num-* override",
    )
    synth.add_argument("--num-train", type=int, default=None, help=f"default {d.num_train}")
    synth.add_argument("--num-val", type=int, default=None, help=f"default {d.num_val}")
    synth.add_argument("--num-test", type=int, default=None, help=f"default {d.num_test}")
    synth.add_argument("--captions-per-image", type=int, default=d.captions_per_image)
    synth.add_argument("--min-objects", type=int, default=d.min_objects)
    synth.add_argument("--max-objects", type=int, default=d.max_objects)
    synth.add_argument("--image-format", choices=("png", "jpg"), default=d.image_format)
    synth.add_argument("--tokenizer-vocab-size", type=int, default=d.tokenizer_vocab_size, help="0 = no tokenizer")
    synth.add_argument("--no-refexp", action="store_true", help="do not write refexp_{split}.json")
    synth.add_argument("--overwrite", action="store_true", help="replace images/ and annotations/ not made by synth")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = sub.add_parser("verify", help="scan every record and image of a dataset; exit 1 on errors")
    verify.add_argument(
        "dir", nargs="?", type=Path, default=None, help="dataset directory: check every annotation file of --format"
    )
    verify.add_argument("--format", required=True, choices=sorted(FORMATS))
    verify.add_argument("--ann", type=Path, default=None, help="annotation file (instead of DIR)")
    verify.add_argument(
        "--images", type=Path, default=None, help="image folder the file names are relative to (DIR: found)"
    )
    verify.add_argument("--no-images", action="store_true", help="check the annotations only")
    verify.add_argument("--image-template", default=None, help="vqa-questions: image name pattern")
    verify.add_argument("--max-listed", type=int, default=50, help="list at most this many errors (0 = all)")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")

    stats = sub.add_parser("stats", help="sizes, text lengths, class frequencies and boxes per image")
    stats.add_argument("--format", required=True, choices=sorted(FORMATS))
    stats.add_argument("--ann", required=True, type=Path, help="annotation file")
    stats.add_argument("--images", type=Path, default=None, help="image folder: read sizes of unsized images")
    stats.add_argument("--tokenizer", default=None, help="count tokens of this tokenizer (default: words)")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON")

    tok = sub.add_parser("train-tokenizer", help="train the offline byte-level BPE on captions")
    tok.add_argument(
        "--ann", required=True, type=Path, nargs="+", help="COCO captions or detection / Karpathy JSON / text files"
    )
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--out", required=True, type=Path, help="output tokenizer JSON")
    return parser


def _progress_bar(total: int | None, desc: str, enabled: bool) -> tuple[Callable[[int], object], Callable[[], object]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return (lambda n: None), (lambda: None)
    bar = tqdm(total=total or None, desc=desc, unit="img")
    return bar.update, bar.close


def _split_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    d = SyntheticWorldConfig()
    if args.size is not None:
        if args.size < 0:
            raise ValueError(f"--size must be >= 0, got {args.size}")
        base = (
            args.size,
            max(1, round(args.size / 10)) if args.size else 0,
            max(1, round(args.size / 10)) if args.size else 0,
        )
    else:
        base = (d.num_train, d.num_val, d.num_test)
    given = (args.num_train, args.num_val, args.num_test)
    train, val, test = (b if g is None else g for b, g in zip(base, given))
    return train, val, test


def _synth(args: argparse.Namespace) -> int:
    num_train, num_val, num_test = _split_sizes(args)
    config = SyntheticWorldConfig(
        seed=args.seed,
        image_size=args.image_size,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        captions_per_image=args.captions_per_image,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        image_format=args.image_format,
        tokenizer_vocab_size=args.tokenizer_vocab_size,
        referring_expressions=not args.no_refexp,
    )
    root = generate_world(args.out, config, progress=not args.quiet, overwrite=args.overwrite)
    manifest = load_world_manifest(root) or {}
    splits = manifest.get("splits", {})
    counts = ", ".join(
        f"{s}: {splits[s]['images']} images / {splits[s]['captions']} captions"
        for s in ("train", "val", "test")
        if s in splits
    )
    print(f"synthetic world at {root} ({counts})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if (args.dir is None) == (args.ann is None):
        print("fiber-data verify: error: give either a dataset directory DIR or --ann FILE", file=sys.stderr)
        return 2
    if args.dir is not None:
        pairs = discover_datasets(args.format, args.dir, args.images)
    elif args.images is None:
        print("fiber-data verify: error: --ann needs --images", file=sys.stderr)
        return 2
    else:
        pairs = [(args.ann, args.images)]
    ok = True
    for ann, images in pairs:
        # The number of images is known only after parsing, so the bar runs without a total.
        update, close = _progress_bar(0, "verify", not args.quiet and not args.no_images)
        report = verify_annotations(
            args.format,
            ann,
            images,
            check_images=not args.no_images,
            progress=update,
            image_template=args.image_template,
        )
        close()
        ok = ok and report.ok
        warned = f", {len(report.warnings)} warnings" if report.warnings else ""
        print(
            f"{report.ann_file}: {report.num_records} records, {report.num_images} images, "
            f"{len(report.errors)} errors{warned}"
        )
        for kind, items in (("ERROR", report.errors), ("WARNING", report.warnings)):
            listed = items if args.max_listed <= 0 else items[: args.max_listed]
            for err in listed:
                print(f"  {kind} {err}")
            if len(listed) < len(items):
                print(f"  ... and {len(items) - len(listed)} more")
    return 0 if ok else 1


def _stats(args: argparse.Namespace) -> int:
    from fiber_data.stats import dataset_stats, format_stats

    tokenizer = None
    if args.tokenizer is not None:
        from fiber_data.text.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    stats = dataset_stats(args.format, args.ann, args.images, tokenizer=tokenizer)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def _read_texts(path: Path) -> list[str]:
    """Captions of a COCO captions file or Karpathy JSON, class names of a COCO detection file, or the lines of a
    text file."""
    if path.suffix == ".json":
        from fiber_data.io import read_json

        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            captions = [
                a["caption"] for a in data["annotations"] if isinstance(a, dict) and isinstance(a.get("caption"), str)
            ]
            if captions or not isinstance(data.get("categories"), list):
                return captions
            # a COCO detection file: the texts the model will read are the class-name prompts
            return [c["name"] for c in data["categories"] if isinstance(c, dict) and isinstance(c.get("name"), str)]
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return [
                s["raw"]
                for im in data["images"]
                if isinstance(im, dict)
                for s in im.get("sentences", [])
                if isinstance(s, dict) and isinstance(s.get("raw"), str)
            ]
        raise DataError("expected COCO captions ('annotations') or Karpathy JSON ('images')", file=path)
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _train_tokenizer(args: argparse.Namespace) -> int:
    from fiber_data.text.tokenizer import ByteBPETokenizer

    texts: list[str] = []
    for path in args.ann:
        found = _read_texts(path)
        if not found:
            raise DataError("no text to train a tokenizer on (no captions, class names or lines)", file=path)
        texts.extend(found)
    tok = ByteBPETokenizer.train(texts, args.vocab_size, min_frequency=args.min_frequency)
    tok.save(args.out)
    print(f"trained on {len(texts)} texts: vocab_size={tok.vocab_size} ({len(tok.merges)} merges) -> {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fiber-data``.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 success, 1 problems found or a data error, 2 bad usage.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. synth progress without tqdm
    handlers = {"synth": _synth, "verify": _verify, "stats": _stats, "train-tokenizer": _train_tokenizer}
    try:
        return handlers[args.command](args)
    except (DataError, FileExistsError, ValueError) as exc:
        print(f"fiber-data {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
