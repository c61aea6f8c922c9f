"""Coarse training step with shared uni-modal prefixes versus the reference's per-pass recomputation.

The layers below the first fused block/layer compute the same thing in the MLM, ITC and ITM passes of a
coarse step. ``model.share_prefix=true`` (the default) computes each image's prefix once and each text's
prefix once (plus the masked MLM text), then re-indexes them for the ITM positives and hard negatives;
``false`` is the reference's way (image tower 5x, text tower 5x per step).

Measures, for both modes: step time (forward + backward + AdamW), peak memory, and the losses in eval mode
(no dropout/drop-path) with the same hard-negative draws, which must agree to 1e-5.

Full run (the issue's setting): ``python benchmarks/shared_prefix.py`` -> fiber-base, 384 px, batch 4,
bf16 autocast, in-batch negatives. ``--quick`` uses fiber-tiny.
"""

from __future__ import annotations

import torch
from _common import Recorder, base_parser, finish, measure_peak_memory, setup, time_fn

from fiber_backbones import create_backbone
from fiber_data import ImageTextBatch
from fiber_train.tasks.coarse import CoarseModel


def make_batch(n: int, size: int, length: int, vocab: int) -> ImageTextBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    labels = torch.full((n, length), -100)
    labels[:, 2:6] = ids[:, 2:6]
    masked = ids.clone()
    masked[:, 2:6] = 4
    return ImageTextBatch(
        torch.randn(n, 3, size, size, generator=g), ids, mask, masked, labels, torch.arange(n),
        tuple(range(n)), tuple("" for _ in range(n)),
    )  # fmt: skip


def main() -> None:
    p = base_parser((__doc__ or "").split("\n")[0])
    p.add_argument("--backbone", default=None, help="backbone name (default fiber-base; --quick: fiber-tiny)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="bf16", help="autocast dtype: bf16 or fp32")
    p.add_argument(
        "--only",
        choices=["shared", "per-pass"],
        default=None,
        help="measure one mode (run each in its own process for a clean peak-memory figure)",
    )
    p.add_argument("--compile", choices=["off", "on"], default="off", help="regional compile of the backbone blocks")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto", help="fused AdamW (auto: on CUDA)")
    args = p.parse_args()
    dev = setup(args, repeat=(3, 2), warmup=(1, 1))
    name = args.backbone or ("fiber-tiny" if args.quick else "fiber-base")
    size = 64 if name == "fiber-tiny" else 384
    length, vocab, hidden = (16, 1000, 64) if name == "fiber-tiny" else (40, 50265, 768)
    rec = Recorder(
        "shared_prefix" + (f"_{args.only}" if args.only else ""),
        args,
        {
            "backbone": name,
            "image_size": size,
            "batch": args.batch,
            "dtype": args.dtype,
            "compile": args.compile,
            "fused": args.fused,
        },
    )
    fused = args.fused == "on" or (args.fused == "auto" and dev.type == "cuda")
    batch = make_batch(args.batch, size, length, vocab).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    rows = []
    losses = {}
    modes = [m for m in (False, True) if args.only is None or args.only == ("shared" if m else "per-pass")]
    for share in modes:
        torch.manual_seed(0)
        backbone = create_backbone(name, text={"vocab_size": vocab})
        model = CoarseModel(backbone, vocab, hidden, hidden, {"itc": 1, "itm": 1, "mlm": 1}, share_prefix=share).to(dev)
        # eval-mode losses with identical hard-negative draws (fp32: exactness check)
        model.eval()
        with torch.no_grad():
            torch.manual_seed(1)
            out = model(batch)
        losses[share] = {k: float(v) for k, v in out.logs.items() if k.endswith("/loss")}
        model.train()
        if args.compile == "on":  # after the eager loss check; the timing's warm-up call compiles
            backbone.compile_blocks(**({"backend": args.compile_backend} if args.compile_backend else {}))
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=fused or None)

        def step(model: CoarseModel = model, opt: torch.optim.Optimizer = opt) -> None:
            with amp:
                loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        timing = time_fn(step, dev, args.repeat, args.warmup)
        with measure_peak_memory(dev) as mem:
            step()
        row = {
            "mode": "shared" if share else "per-pass",
            "compile": args.compile == "on",
            "fused": fused,
            **timing,
            "samples_per_s": args.batch / timing["min_s"],
            **mem,
            **losses[share],
        }
        rows.append(row)
        rec.add(row)
    if len(rows) < 2:
        finish(
            rec,
            rows,
            [
                "mode",
                "compile",
                "median_s",
                "min_s",
                "samples_per_s",
                "peak_mem_mib",
                "itc/loss",
                "itm/loss",
                "mlm/loss",
            ],
        )
        return
    naive, shared = rows
    ratio_t = shared["median_s"] / naive["median_s"]
    ratio_m = shared["peak_mem_mib"] / max(naive["peak_mem_mib"], 1e-9)
    max_diff = max(abs(losses[True][k] - losses[False][k]) for k in losses[True])
    rec.doc["summary"] = {"time_ratio": ratio_t, "memory_ratio": ratio_m, "max_loss_diff_eval": max_diff}
    rec.note(
        f"shared/per-pass: step time x{ratio_t:.2f}, peak memory x{ratio_m:.2f}; eval losses differ by {max_diff:.2e}"
    )
    finish(
        rec,
        rows,
        ["mode", "compile", "median_s", "min_s", "samples_per_s", "peak_mem_mib", "itc/loss", "itm/loss", "mlm/loss"],
    )


if __name__ == "__main__":
    main()
