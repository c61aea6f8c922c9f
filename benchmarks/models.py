"""fiber-models: ``from_pretrained`` cost of a full-size model and pipeline throughput per task.

1. **Load.** A ``CoarseModel`` on the ``fiber-base`` backbone (random weights; ``--quick``: ``fiber-tiny``) is
   saved once with ``save_pretrained``; then ``fiber_models.load`` is timed (seconds, wall and CPU) and its peak
   memory measured (process RSS delta on CPU, ``max_memory_allocated`` on CUDA). The file size is reported.
2. **Pipelines.** Every task pipeline runs on tiny random models (``fiber_models.examples.tiny_model``: the
   ``fiber-tiny`` geometry with 8-wide Swin and 16-wide text) over ``--images`` synthetic images in batches of
   ``--batch-size``; images per second are reported. These numbers measure the pipeline machinery
   (decoding, preprocessing, batching, post-processing) more than the network, which is tiny here.

Usage::

    python benchmarks/models.py            # fiber-base load + pipelines
    python benchmarks/models.py --quick    # fiber-tiny load, fewer images (smoke test)
    python benchmarks/models.py --device cuda
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import Recorder, base_parser, finish, measure_peak_memory, setup, time_fn

import fiber_models
from fiber_backbones import create_backbone
from fiber_models import CoarseModel, RetrievalIndex, pipeline
from fiber_models.examples import example_image, tiny_model


def _load_row(name: str, root: Path, dev: torch.device, args: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    h = backbone.text_dim
    model = CoarseModel(backbone, backbone.config.text.vocab_size, h, h, {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
    path = model.save_pretrained(root / name)
    n_params = sum(p.numel() for p in model.parameters())
    del model, backbone
    with measure_peak_memory(dev) as mem:
        loaded = fiber_models.load(path, device=dev)
    del loaded
    t = time_fn(lambda: fiber_models.load(path, device=dev), dev, args.repeat, args.warmup)
    return {
        "part": "load",
        "what": f"fiber_models.load ({name} CoarseModel)",
        "params_m": round(n_params / 1e6, 1),
        "file_mib": round((path / "model.safetensors").stat().st_size / 2**20, 1),
        "median_s": round(t["median_s"], 3),
        "min_s": round(t["min_s"], 3),
        "cpu_min_s": round(t["cpu_min_s"], 3),
        **mem,
    }


def _pipeline_rows(root: Path, dev: torch.device, args: Any) -> list[dict[str, Any]]:
    n, bs = args.images, args.batch_size
    folder = root / "images"
    folder.mkdir()
    files = []
    for i in range(n):
        example_image(folder / f"{i}.png", size=(96 + 8 * (i % 4), 72))
        files.append(str(folder / f"{i}.png"))
    texts = ["a red circle on the left"] * n
    models = {t: tiny_model(t, root / t) for t in ("coarse", "retrieval", "vqa", "caption", "grounding")}
    jobs = {
        "image-text-scoring": lambda p: p(files, texts),
        "feature-extraction": lambda p: p(images=files),
        "vqa": lambda p: p(files, ["what color is the circle?"] * n, top_k=5),
        "captioning": lambda p: p(files, beam_size=2),
        "zero-shot-detection": lambda p: p(files, ["red circle", "blue square"]),
        "phrase-grounding": lambda p: p(files, texts),
        "referring-expression": lambda p: p(files, texts),
    }
    model_of = {
        "image-text-scoring": "coarse",
        "feature-extraction": "retrieval",
        "vqa": "vqa",
        "captioning": "caption",
        "zero-shot-detection": "grounding",
        "phrase-grounding": "grounding",
        "referring-expression": "grounding",
    }
    rows = []
    for task, job in jobs.items():
        pipe = pipeline(task, models[model_of[task]], device=dev, batch_size=bs)
        t = time_fn(lambda job=job, pipe=pipe: job(pipe), dev, args.repeat, args.warmup)
        rows.append(_throughput_row(task, n, bs, t))
    index = RetrievalIndex(models["retrieval"], device=dev, batch_size=bs)
    t = time_fn(
        lambda: RetrievalIndex(models["retrieval"], device=dev, batch_size=bs).add_folder(folder),
        dev,
        args.repeat,
        args.warmup,
    )
    rows.append(_throughput_row("retrieval (index a folder)", n, bs, t))
    index.add_folder(folder)
    t = time_fn(lambda: index.search("a red circle", top_k=5, rerank=True), dev, args.repeat, args.warmup)
    rows.append({"part": "pipeline", "what": "retrieval (query, top-5 + ITM re-rank)", "images": n, "batch": bs,
                 "median_s": round(t["median_s"], 4), "min_s": round(t["min_s"], 4), "queries_per_s": round(1 / t["min_s"], 1)})  # fmt: skip
    return rows


def _throughput_row(task: str, n: int, bs: int, t: dict[str, Any]) -> dict[str, Any]:
    return {
        "part": "pipeline",
        "what": task,
        "images": n,
        "batch": bs,
        "median_s": round(t["median_s"], 4),
        "min_s": round(t["min_s"], 4),
        "images_per_s": round(n / t["min_s"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--load-backbone", default=None, help="backbone of the load measurement (default fiber-base)")
    p.add_argument("--images", type=int, default=None, help="images per pipeline call (default 32; quick 8)")
    p.add_argument("--batch-size", type=int, default=8, help="pipeline batch size")
    args = p.parse_args(argv)
    dev = setup(args, repeat=(3, 1), warmup=(1, 0))
    args.images = args.images or (8 if args.quick else 32)
    load_name = args.load_backbone or ("fiber-tiny" if args.quick else "fiber-base")
    rec = Recorder("models", args, {"load_backbone": load_name, "images": args.images, "batch_size": args.batch_size})
    rec.note("load: random weights saved with save_pretrained, then fiber_models.load (build + read + strict load)")
    rec.note("pipelines: tiny random models (fiber_models.examples.tiny_model), synthetic 96-120 x 72 PNG files")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rec.add(_load_row(load_name, root, dev, args))
        for row in _pipeline_rows(root, dev, args):
            rec.add(row)
    columns = [
        "part",
        "what",
        "params_m",
        "file_mib",
        "min_s",
        "median_s",
        "peak_mem_mib",
        "images_per_s",
        "queries_per_s",
    ]
    finish(rec, rec.results, columns)


if __name__ == "__main__":
    main()
