"""Input-pipeline throughput of the fiber-data loaders, per worker count, and whether a GPU step would starve.

Writes a synthetic world (:func:`fiber_data.generate_world`, JPEG images of ``--image-size`` px) and times full
epochs-worth of batches through ``torch.utils.data.DataLoader`` with the project's datasets and collators:

- ``captions``: :class:`fiber_data.CocoCaptionsDataset` + :class:`fiber_data.ImageTransform` (coarse pre-training
  at ``--coarse-size`` px) + :class:`fiber_data.ImageTextCollator` (40 tokens, MLM masking 15 %);
- ``grounding``: :class:`fiber_data.MdetrGroundingDataset` + :class:`fiber_data.GroundingTransform` (short side
  ``--fine-size``, long side ≤ 1333) + :class:`fiber_data.GroundingCollator` (256 tokens, positive maps).

For each loader and worker count it reports samples/s (after the first batch, which pays worker start-up) and
samples/s per worker. Given the GPU's step time for that stage (``--gpu-step-s``, seconds per batch of
``--batch`` samples; e.g. from ``backbone.py --device cuda``), it reports the rate the GPU consumes and whether
the loader keeps up (``starved``), plus the workers a node would need at the measured per-worker rate.

Usage::

    python benchmarks/data_loading.py [--workers 0 1 2] [--gpu-step-s 0.35 1.2]
    python benchmarks/data_loading.py --quick
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import Recorder, base_parser, finish, setup
from torch.utils.data import DataLoader, Dataset

from fiber_data import (
    ByteBPETokenizer,
    CocoCaptionsDataset,
    GroundingCollator,
    GroundingTransform,
    ImageTextCollator,
    ImageTransform,
    MdetrGroundingDataset,
    SyntheticWorldConfig,
    generate_world,
)


def build(kind: str, root: Path, args: Any) -> tuple[Dataset, Any]:
    """Dataset and collator of ``kind`` over the world at ``root``."""
    tok = ByteBPETokenizer.load(root / "tokenizer.json")
    if kind == "captions":
        ds = CocoCaptionsDataset(
            root / "annotations" / "captions_train.json",
            root / "images" / "train",
            transform=ImageTransform(args.coarse_size),
        )
        return ds, ImageTextCollator(tok, max_length=40, mlm_probability=0.15)
    transform = GroundingTransform(min_sizes=(args.fine_size,), max_size=1333, train=True)
    ds = MdetrGroundingDataset(root / "annotations" / "grounding_train.json", root / "images" / "train", transform)
    return ds, GroundingCollator(tok, max_length=256)


def measure(ds: Dataset, collate: Any, batch: int, workers: int, max_batches: int) -> dict[str, Any]:
    """Samples/s of one pass (at most ``max_batches`` batches), excluding the first batch."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
    )
    it = iter(loader)
    t_start = time.perf_counter()
    next(it)
    t_first = time.perf_counter() - t_start
    n, t0 = 0, time.perf_counter()
    for i, _ in enumerate(it):
        n += batch
        if i + 2 >= max_batches:
            break
    dt = time.perf_counter() - t0
    del it
    return {"first_batch_s": t_first, "samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else None}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="world folder (default: a temporary one)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default 0 1 2 (quick 0 1)")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 16, quick 4)")
    p.add_argument("--images", type=int, default=None, help="train images in the world (default 256, quick 16)")
    p.add_argument("--image-size", type=int, default=None, help="world image side (default 640, quick 96)")
    p.add_argument("--coarse-size", type=int, default=None, help="coarse transform size (default 384, quick 64)")
    p.add_argument("--fine-size", type=int, default=None, help="grounding short side (default 800, quick 96)")
    p.add_argument("--max-batches", type=int, default=None, help="batches per measurement (default 12, quick 4)")
    p.add_argument(
        "--gpu-step-s",
        type=float,
        nargs=2,
        default=[0.35, 1.2],
        metavar=("COARSE", "FINE"),
        help="assumed GPU seconds per batch of --batch samples for captions / grounding",
    )
    args = p.parse_args(argv)
    setup(args, repeat=(1, 1), warmup=(0, 0))
    q = args.quick
    workers = args.workers if args.workers is not None else ([0, 1] if q else [0, 1, 2])
    batch = args.batch or (4 if q else 16)
    n_images = args.images or (16 if q else 256)
    args.image_size = args.image_size or (96 if q else 640)
    args.coarse_size = args.coarse_size or (64 if q else 384)
    args.fine_size = args.fine_size or (96 if q else 800)
    max_batches = args.max_batches or (4 if q else 12)
    rec = Recorder(
        "data_loading",
        args,
        {
            "workers": workers,
            "batch": batch,
            "images": n_images,
            "image_size": args.image_size,
            "coarse_size": args.coarse_size,
            "fine_size": args.fine_size,
            "max_batches": max_batches,
            "gpu_step_s": {"captions": args.gpu_step_s[0], "grounding": args.gpu_step_s[1]},
        },
    )
    with tempfile.TemporaryDirectory(prefix="fiber_bench_world_") as tmp:
        root = args.root or Path(tmp) / "world"
        t0 = time.perf_counter()
        generate_world(
            root,
            SyntheticWorldConfig(
                image_size=args.image_size,
                num_train=n_images,
                num_val=2,
                num_test=2,
                image_format="jpg",
                vqa_questions_per_image=0,
                nlvr2_statements_per_pair=0,
            ),
            progress=False,
        )
        rec.doc["world_generation_s"] = time.perf_counter() - t0
        for kind, step_s in (("captions", args.gpu_step_s[0]), ("grounding", args.gpu_step_s[1])):
            ds, collate = build(kind, root, args)
            gpu_rate = batch / step_s
            for w in workers:
                r = measure(ds, collate, batch, w, max_batches)
                per_worker = r["samples_per_s"] / max(w, 1)
                rec.add(
                    {
                        "loader": kind,
                        "workers": w,
                        "batch": batch,
                        **r,
                        "samples_per_s_per_worker": per_worker,
                        "gpu_samples_per_s": gpu_rate,
                        "starved": r["samples_per_s"] < gpu_rate,
                        "workers_needed": math.ceil(gpu_rate / per_worker),
                    }
                )
    rec.note(
        "gpu_samples_per_s = batch / gpu_step_s (an assumed GPU step time; pass measured ones with --gpu-step-s); "
        "workers 0 = loading in the main process"
    )
    rec.note("synthetic JPEGs are simple drawings; real photos decode slower, so treat rates as upper bounds")
    finish(
        rec,
        rec.results,
        [
            "loader",
            "workers",
            "batch",
            "samples_per_s",
            "samples_per_s_per_worker",
            "gpu_samples_per_s",
            "starved",
            "workers_needed",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
