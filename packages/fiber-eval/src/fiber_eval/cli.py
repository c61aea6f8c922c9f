"""``fiber-eval``: score prediction files offline (docs/reference/design.md §5; metrics per docs/reference/evaluation.md).

Usage: ``fiber-eval <task> --pred FILE --gt FILE [--out metrics.json]``; ``fiber-eval <task> --help`` describes
the task's file formats. Metrics are printed rounded to 2 decimals; ``--out`` writes the unrounded values as
``{"task": ..., "metrics": {...}, "skipped": {...}}``. A malformed, implausible (boxes in the other format,
unknown category ids, an empty result file) or incomplete file ends with exit code 2 and one line naming the
file, the record and the option that fixes it; ``--debug`` (or ``FIBER_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fiber_eval._io import MissingPredictionsError, PredictionFormatError, load_json

__all__ = ["main"]

FORMATS: dict[str, tuple[str, str]] = {
    "vqa": (
        "VQAv2 accuracy (official evaluator).",
        "--pred: JSON list [{'question_id': int, 'answer': str}, ...]\n"
        "--gt:   v2_mscoco_<split>_annotations.json ({'annotations': [{'question_id', 'answers': [{'answer'}...],\n"
        "        'answer_type', 'question_type'}]})",
    ),
    "nlvr2": (
        "NLVR2 accuracy and consistency.",
        "--pred: JSON list [{'identifier': str, 'prediction': 'True'|'False'|bool}] or {identifier: prediction}\n"
        "--gt:   NLVR2 JSON Lines file (dev.json / test1.json) with 'identifier' and 'label'",
    ),
    "retrieval": (
        "Image-text retrieval R@1/5/10 (i2t = TR, t2i = IR).",
        "--pred: .npz with 'scores' float [N_img, N_txt] and 'text_to_image' int [N_txt]\n"
        "--gt:   optional .npy/.json with text_to_image (overrides the one in --pred)",
    ),
    "caption": (
        "Captioning BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) with PTB tokenisation (needs Java; SPICE skipped).",
        "--pred: JSON list [{'image_id': ..., 'caption': str}, ...], one per GT image\n"
        "--gt:   COCO captions JSON ({'annotations': [{'image_id', 'caption'}, ...]})",
    ),
    "coco": (
        "COCO box AP (pycocotools).",
        "--pred: COCO results JSON [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}]\n"
        "--gt:   COCO instances JSON",
    ),
    "lvis": (
        "LVIS box AP/AR (standard: 300 detections per image; --fixed-ap: Fixed AP), federated rules.",
        "--pred: COCO-format results JSON (bbox xywh, LVIS category ids)\n--gt:   LVIS v1 JSON (e.g. MiniVal)",
    ),
    "odinw": (
        "ODinW: COCO AP per dataset and their unweighted mean.",
        "--pred: one COCO results JSON per dataset\n"
        "--gt:   one COCO GT JSON per dataset (same order); --names gives the dataset names",
    ),
    "flickr30k": (
        "Flickr30k Entities phrase grounding R@1/5/10 (ANY-box; --merged for MERGED).",
        "--pred: JSON list [{'image_id': str, 'sentence_index': int, 'boxes': [[[x1,y1,x2,y2], ...], ...]}],\n"
        "        one ranked box list per evaluated phrase (phrases with a box, sentence order)\n"
        "--gt:   Flickr30k Entities folder with Annotations/, Sentences/ and <split>.txt (--split)",
    ),
    "refexp": (
        "RefCOCO/+/g top-k accuracy (GIoU >= 0.5 by default; --criterion iou for plain IoU).",
        "--pred: JSON list [{'image_id': int, 'boxes': [[x1,y1,x2,y2], ...], 'scores': [...]}]\n"
        "--gt:   MDETR finetune_refcoco*_<split>.json",
    ),
}


def _missing(e: MissingPredictionsError, pred: str, gt: str) -> PredictionFormatError:
    """The CLI wording of a missing-predictions error: names both files and the ``--partial`` flag."""
    if e.missing == 0:
        return PredictionFormatError(f"{pred}: no predictions (empty file?); nothing to score against {gt}")
    return PredictionFormatError(
        f"{pred}: {e.missing} {e.what} of {gt} have no prediction (e.g. {e.examples}); pass --partial to score "
        "only the predicted ones"
    )


def _run_vqa(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.vqa import VQAEvaluator, load_vqa_annotations, load_vqa_results

    ev = VQAEvaluator(load_vqa_annotations(args.gt[0]), strict=not args.partial)
    preds = load_vqa_results(args.pred[0])
    try:
        ev.update(preds)
        return ev.compute(), {}
    except KeyError as e:
        raise PredictionFormatError(f"{args.pred[0]}: {e.args[0]}") from e
    except MissingPredictionsError as e:
        raise _missing(e, args.pred[0], args.gt[0]) from e


def _run_nlvr2(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.nlvr2 import NLVR2Evaluator, load_nlvr2_labels, load_nlvr2_predictions

    ev = NLVR2Evaluator(load_nlvr2_labels(args.gt[0]), strict=not args.partial)
    ev.update(load_nlvr2_predictions(args.pred[0]))
    try:
        return ev.compute(), {}
    except KeyError as e:
        raise PredictionFormatError(f"{args.pred[0]}: {e.args[0]}") from e
    except MissingPredictionsError as e:
        raise _missing(e, args.pred[0], args.gt[0]) from e
    except ValueError as e:  # no prediction at all
        raise PredictionFormatError(f"{args.pred[0]}: {e}") from e


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive, refusing anything else (pickles, ``.npy``, text) with a plain message."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise PredictionFormatError(
            f"{path}: not an .npz archive; save the scores with numpy.savez(path, scores=S, text_to_image=t2i)"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        reason = "it holds pickled (object) arrays" if "pickle" in str(e) else "it cannot be read"
        raise PredictionFormatError(f"{path}: not a valid .npz archive of numeric arrays ({reason})") from e


def _load_text_to_image(path: Path) -> np.ndarray:
    """``text_to_image`` from a ``.npy`` array or a JSON list."""
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise PredictionFormatError(f"{path}: not a readable numeric .npy array") from e
    return np.asarray(load_json(path))


def _run_retrieval(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.retrieval import recall_at_k

    path = Path(args.pred[0])
    arrays = _load_npz(path)
    if "scores" not in arrays:
        raise PredictionFormatError(f"{path}: missing array 'scores'; has {sorted(arrays)}")
    t2i = arrays.get("text_to_image")
    if args.gt:
        t2i = _load_text_to_image(Path(args.gt[0]))
    if t2i is None:
        raise PredictionFormatError(f"{path}: missing array 'text_to_image' (or pass --gt)")
    try:
        m = recall_at_k(arrays["scores"], t2i)
    except ValueError as e:
        raise PredictionFormatError(f"{path}: {e}") from e
    m["num_images"], m["num_texts"] = map(float, arrays["scores"].shape)
    return m, {}


def _run_caption(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.caption import CaptionEvaluator, load_caption_predictions, load_caption_references

    ev = CaptionEvaluator(load_caption_references(args.gt[0]), allow_simple_tokenizer=args.simple_tokenizer)
    preds = load_caption_predictions(args.pred[0])  # names the file itself
    try:
        ev.update(preds)
        scores = ev.compute()
    except (KeyError, ValueError) as e:
        raise PredictionFormatError(f"{args.pred[0]}: {e.args[0]}") from e
    return scores, ev.skipped


def _detection_skipped(metrics: dict[str, float], source: str) -> dict[str, str]:
    n = int(metrics.get("num_dropped_unknown_category", 0))
    return {f"{source}: unknown category ids": f"{n} record(s) dropped (--drop-unknown-categories)"} if n else {}


def _detection_options(args: argparse.Namespace, pred: str) -> dict[str, Any]:
    return {
        "box_format": args.box_format,
        "unknown_categories": "drop" if args.drop_unknown_categories else "error",
        "source": pred,
    }


def _run_coco(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.detection import coco_bbox_eval, load_coco_results

    pred = args.pred[0]
    results = load_coco_results(pred, allow_empty=args.allow_empty)
    m = coco_bbox_eval(args.gt[0], results, **_detection_options(args, pred))
    return m, _detection_skipped(m, pred)


def _run_lvis(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.detection import load_coco_results
    from fiber_eval.lvis_eval import lvis_eval

    pred = args.pred[0]
    results = load_coco_results(pred, allow_empty=args.allow_empty)
    m = lvis_eval(
        args.gt[0],
        results,
        protocol="fixed" if args.fixed_ap else "standard",
        max_dets=args.max_dets,
        **_detection_options(args, pred),
    )
    return m, _detection_skipped(m, pred)


def _run_odinw(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.detection import coco_bbox_eval, load_coco_results, odinw_mean

    if len(args.pred) != len(args.gt):
        raise PredictionFormatError(f"odinw needs one --pred per --gt, got {len(args.pred)} and {len(args.gt)}")
    names = args.names or [Path(g).parent.name or Path(g).stem for g in args.gt]
    if len(names) != len(args.gt) or len(set(names)) != len(names):
        raise PredictionFormatError(f"odinw: --names must give {len(args.gt)} distinct names, got {names}")
    per, skipped = {}, {}
    for name, pred, gt in zip(names, args.pred, args.gt):
        m = coco_bbox_eval(gt, load_coco_results(pred, allow_empty=args.allow_empty), **_detection_options(args, pred))
        per[name] = m["AP"]
        skipped.update(_detection_skipped(m, pred))
    return odinw_mean(per), skipped


def _run_flickr(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.grounding import FlickrEntitiesEvaluator, load_flickr_entities, load_phrase_predictions

    gt = load_flickr_entities(args.gt[0], args.split, keep_unevaluated=True)
    ev = FlickrEntitiesEvaluator(gt, merged=args.merged, box_format=args.box_format)
    preds = load_phrase_predictions(args.pred[0])
    for i, p in enumerate(preds):
        try:
            ev.update([p])
        except (KeyError, ValueError) as e:
            raise PredictionFormatError(f"{args.pred[0]}: record {i}: {e.args[0]}") from e
    try:
        m = ev.compute()
    except ValueError as e:
        raise PredictionFormatError(f"{args.pred[0]}: {e}") from e
    n = int(m.get("num_skipped_sentences", 0))
    skipped = {"sentences without a boxed phrase": f"{n} record(s) with boxes: [] skipped, as the MDETR files do"}
    return m, skipped if n else {}


def _run_refexp(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str]]:
    from fiber_eval.refexp import RefExpEvaluator, load_refexp_predictions, load_refexp_targets

    ev = RefExpEvaluator(
        load_refexp_targets(args.gt[0]), criterion=args.criterion, strict=not args.partial, box_format=args.box_format
    )
    for i, p in enumerate(load_refexp_predictions(args.pred[0])):
        try:
            ev.update([p])
        except KeyError as e:
            raise PredictionFormatError(f"{args.pred[0]}: record {i}: {e.args[0]}") from e
    try:
        return ev.compute(), {}
    except MissingPredictionsError as e:
        raise _missing(e, args.pred[0], args.gt[0]) from e
    except ValueError as e:
        raise PredictionFormatError(f"{args.pred[0]}: {e}") from e


# task -> (the box format its prediction files hold, the one --box-format can convert from)
BOX_FORMATS: dict[str, tuple[str, str]] = {
    "coco": ("xywh", "xyxy"),
    "lvis": ("xywh", "xyxy"),
    "odinw": ("xywh", "xyxy"),
    "flickr30k": ("xyxy", "xywh"),
    "refexp": ("xyxy", "xywh"),
}

RUNNERS: dict[str, Callable[[argparse.Namespace], tuple[dict[str, float], dict[str, str]]]] = {
    "vqa": _run_vqa,
    "nlvr2": _run_nlvr2,
    "retrieval": _run_retrieval,
    "caption": _run_caption,
    "coco": _run_coco,
    "lvis": _run_lvis,
    "odinw": _run_odinw,
    "flickr30k": _run_flickr,
    "refexp": _run_refexp,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``fiber-eval`` argument parser (one sub-command per task)."""
    epilog = "tasks and file formats:\n" + "\n".join(
        f"\n  {task}: {summary}\n" + "\n".join("    " + ln for ln in fmt.splitlines())
        for task, (summary, fmt) in FORMATS.items()
    )
    parser = argparse.ArgumentParser(
        prog="fiber-eval",
        description="Score FIBER benchmark prediction files offline.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, (summary, fmt) in FORMATS.items():
        p = sub.add_parser(
            task,
            help=summary,
            description=f"{summary}\n\n{fmt}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        multi = "+" if task == "odinw" else None
        p.add_argument("--pred", required=True, nargs=multi or 1, help="prediction file(s)")
        p.add_argument("--gt", required=task != "retrieval", nargs=multi or 1, default=[], help="ground truth")
        p.add_argument("--out", type=Path, default=None, help="write unrounded metrics as JSON here")
        if task in ("vqa", "nlvr2", "refexp"):
            p.add_argument("--partial", action="store_true", help="score only the predicted items")
        if task == "caption":
            p.add_argument(
                "--simple-tokenizer", action="store_true", help="without Java, use whitespace tokens (not official)"
            )
        if task == "odinw":
            p.add_argument("--names", nargs="+", default=None, help="dataset names, in --gt order")
        if task == "flickr30k":
            p.add_argument("--split", default="test", help="split list <gt>/<split>.txt (default: test)")
            p.add_argument("--merged", action="store_true", help="MERGED protocol (enclosing box per entity)")
        if task == "refexp":
            p.add_argument("--criterion", choices=("giou", "iou"), default="giou")
        if task in BOX_FORMATS:
            expected, other = BOX_FORMATS[task]
            p.add_argument(
                "--box-format",
                choices=(expected, other),
                default=expected,
                help=f"box format of --pred (default {expected}; {other} is converted)",
            )
        if task in ("coco", "lvis", "odinw"):
            p.add_argument("--allow-empty", action="store_true", help="score an empty prediction file as 0")
            p.add_argument(
                "--drop-unknown-categories",
                action="store_true",
                help="drop (and count) records whose category_id is not in --gt instead of refusing the file",
            )
        if task == "lvis":
            p.add_argument(
                "--fixed-ap",
                action="store_true",
                help="Fixed AP (top 10,000 per category, no per-image cap) instead of the standard LVIS result",
            )
            p.add_argument("--max-dets", type=int, default=300, help="per-image cap of the standard result (300)")
        p.add_argument("--debug", action="store_true", help="print the traceback of an error (also FIBER_DEBUG=1)")
    return parser


def _rounded(metrics: dict[str, float]) -> dict[str, Any]:
    return {k: (round(v, 2) if math.isfinite(v) else None) for k, v in metrics.items()}


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """One line per warning on stderr (no source line): ``fiber-eval: warning: ...``."""
    print(f"fiber-eval: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a malformed, inconsistent, implausible or missing input file (one line on stderr
        naming the file and what to do; the traceback only with ``--debug`` or ``FIBER_DEBUG=1``).
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FIBER_DEBUG", "") not in ("", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        try:
            metrics, skipped = RUNNERS[args.task](args)
        except (OSError, ImportError, ValueError, KeyError) as e:
            # PredictionFormatError is a ValueError; the library raises KeyError/ValueError for inconsistent sets
            if debug:
                raise
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
                message = f"{e.filename}: {e.strerror}"
            text = " ".join(str(message).split("\n"))  # always one line
            print(f"fiber-eval {args.task}: error: {text}", file=sys.stderr)
            return 2
    print(json.dumps({"task": args.task, "metrics": _rounded(metrics), "skipped": skipped}, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"task": args.task, "metrics": metrics, "skipped": skipped}
        args.out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
