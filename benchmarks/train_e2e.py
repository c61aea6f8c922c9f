"""End-to-end training throughput of ``fiber-train coarse`` (ITC + ITM + MLM), through fiber_train's Python API.

Runs :func:`fiber_train.fit` on :class:`fiber_train.CoarsePretrainTask` built from the packaged ``coarse/tiny``
recipe (synthetic world, generated on first use under ``--data``) with overrides, and reads the per-step
``step_time_s`` / ``samples_per_s`` that the training loop logs to ``metrics.csv``. The first ``--skip`` steps
(start-up, first-touch allocations) are dropped; median and min over the rest are reported.

Configurations (``--configs``):

- ``tiny_fp32`` / ``tiny_bf16``: ``fiber-tiny`` at 64 px, batch 32 (quick: 8), precision ``32-true`` /
  ``bf16-mixed``;
- ``base_fp32`` / ``base_bf16``: ``fiber-base`` at 384 px, text 40, batch 2, ``32-true`` / ``bf16-mixed``, a
  couple of steps (each step runs the MLM, ITC and 3B-pair ITM passes of the coarse objective).

A configuration that raises is recorded with its ``error`` and the others still run.

Usage::

    python benchmarks/train_e2e.py [--configs tiny_fp32 tiny_bf16 base_bf16] [--steps 8]
    python benchmarks/train_e2e.py --quick
"""

from __future__ import annotations

import csv
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import Recorder, base_parser, finish, setup

from fiber_train import CoarseConfig, CoarsePretrainTask, fit, load_config

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny_fp32": {"batch": 32, "quick_batch": 8, "set": ["trainer.precision=32-true"]},
    "tiny_bf16": {"batch": 32, "quick_batch": 8, "set": ["trainer.precision=bf16-mixed"]},
    "base_fp32": {
        "batch": 2,
        "quick_batch": 2,
        "set": [
            "model.backbone=fiber-base",
            "model.hidden_dim=768",
            "model.itc_dim=256",
            "data.image_size=384",
            "data.max_text_len=40",
            "trainer.precision=32-true",
        ],
    },
    "base_bf16": {
        "batch": 2,
        "quick_batch": 2,
        "set": [
            "model.backbone=fiber-base",
            "model.hidden_dim=768",
            "model.itc_dim=256",
            "data.image_size=384",
            "data.max_text_len=40",
            "trainer.precision=bf16-mixed",
        ],
    },
}


def read_steps(run_dir: Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` that carry a step time."""
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [
            {
                "step": float(r["step"]),
                "step_time_s": float(r["step_time_s"]),
                "samples_per_s": float(r["samples_per_s"]),
            }
            for r in csv.DictReader(fh)
            if r.get("step_time_s")
        ]


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="training steps per config (default 12 tiny / 3 base)")
    p.add_argument("--skip", type=int, default=None, help="leading steps not counted (default 2, quick 1)")
    p.add_argument("--data", type=Path, default=None, help="synthetic world folder (default: temporary)")
    args = p.parse_args(argv)
    setup(args, repeat=(1, 1), warmup=(0, 0))
    configs = args.configs or (["tiny_fp32"] if args.quick else ["tiny_fp32", "tiny_bf16", "base_fp32", "base_bf16"])
    skip = args.skip if args.skip is not None else (1 if args.quick else 2)
    rec = Recorder("train_e2e", args, {"configs": {c: CONFIGS[c] for c in configs}, "skip": skip})
    with tempfile.TemporaryDirectory(prefix="fiber_bench_train_") as tmp:
        data_root = args.data or Path(tmp) / "world"
        for cname in configs:
            c = CONFIGS[cname]
            batch = c["quick_batch"] if args.quick else c["batch"]
            steps = args.steps or (3 if args.quick else (3 if cname.startswith("base") else 12))
            steps = max(steps, skip + 1)
            overrides = [
                f"data.root={data_root}",
                f"data.batch_size={batch}",
                f"trainer.max_steps={steps}",
                "trainer.log_every=1",
                f"trainer.ckpt_every={steps * 10}",
                "trainer.progress=false",
                "trainer.accelerator=" + ("cuda" if args.device.startswith("cuda") else "cpu"),
                "eval.retrieval=false",
                "data.synthetic_train=64",
                "data.synthetic_val=4",
                "data.synthetic_test=4",
                *c["set"],
            ]
            if args.quick:
                overrides += ["model.hidden_dim=32", "model.itc_dim=32", "data.max_text_len=16"]
            cfg = load_config(CoarseConfig, "coarse/tiny", overrides)
            torch.manual_seed(0)
            try:
                result = fit(CoarsePretrainTask(cfg), Path(tmp) / "runs" / cname)
            except Exception as exc:  # record the failure and go on with the other configurations
                rec.add(
                    {"config": cname, "batch": batch, "error": f"{type(exc).__name__}: {exc}", "overrides": overrides}
                )
                print(f"{cname}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            rows = read_steps(result.run_dir)
            timed = [r for r in rows if r["step"] > skip] or rows
            st = [r["step_time_s"] for r in timed]
            rec.add(
                {
                    "config": cname,
                    "batch": batch,
                    "steps": result.step,
                    "timed_steps": len(st),
                    "step_time_median_s": statistics.median(st),
                    "step_time_min_s": min(st),
                    "samples_per_s_median": batch / statistics.median(st),
                    "samples_per_s_best": batch / min(st),
                    "fit_seconds": result.seconds,
                    "overrides": overrides,
                }
            )
    rec.note("step times come from the loop's own metrics.csv (log_every=1); fit_seconds includes start-up")
    finish(
        rec,
        rec.results,
        [
            "config",
            "batch",
            "timed_steps",
            "step_time_median_s",
            "step_time_min_s",
            "samples_per_s_median",
            "samples_per_s_best",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
