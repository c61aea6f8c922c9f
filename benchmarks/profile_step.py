"""Where the time of one backbone step goes: ``torch.profiler`` operator table of a forward or training step.

Runs the configurations of :mod:`backbone` (``--config``, ``--dtype``, ``--backend``, ``--mode``) under
``torch.profiler`` for ``--repeat`` steps after warm-up and reports the operators by self time, plus the share of
the step spent in matmul-class kernels (``mm``, ``bmm``, ``addmm``, ``linear``, attention kernels, convolution):
everything else (copies, layout changes, normalisation, element-wise ops) is the overhead that keeps MFU below
the matmul peak.

Usage::

    python benchmarks/profile_step.py --config coarse384 --dtype bf16 --mode train
    python benchmarks/profile_step.py --quick
"""

from __future__ import annotations

from typing import Any

import torch
from _common import Recorder, base_parser, dtype_of, finish, setup
from backbone import CONFIGS, make_inputs, step_fns
from torch.profiler import ProfilerActivity, profile

from fiber_backbones import create_backbone

MATMUL_OPS = (
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_efficient_attention_backward",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_efficient_attention_forward",
    "aten::_efficient_attention_backward",
    "aten::_flash_attention_forward",
    "aten::_flash_attention_backward",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_cudnn_attention_backward",
)


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--config", default=None, choices=sorted(CONFIGS))
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--mode", default="train", choices=["fwd", "train"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=25, help="operators to list")
    args = p.parse_args(argv)
    dev = setup(args, repeat=(3, 1), warmup=(1, 1))
    cname = args.config or ("tiny" if args.quick else "coarse384")
    c = CONFIGS[cname]
    rec = Recorder(
        "profile_step",
        args,
        {"config": cname, "dtype": args.dtype, "backend": args.backend, "mode": args.mode, "batch": args.batch},
    )
    torch.manual_seed(0)
    model = create_backbone(c["model"], **c["overrides"]).to(dev)
    model.set_attention_backend(args.backend)
    pixels, text = make_inputs(args.batch, c["hw"], c["text_len"], model.config.text.vocab_size, dev)
    fn = step_fns(model, pixels, text, dtype_of(args.dtype), dev)[args.mode]
    for _ in range(args.warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeat):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    use_cuda = dev.type == "cuda"

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if use_cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events)
    matmul = sum(self_us(e) for e in events if e.key in MATMUL_OPS)
    for e in sorted(events, key=self_us, reverse=True)[: args.top]:
        rec.results.append(
            {
                "op": e.key,
                "calls": int(e.count) // max(args.repeat, 1),
                "self_ms_per_step": self_us(e) / 1e3 / max(args.repeat, 1),
                "self_pct": 100.0 * self_us(e) / max(total, 1.0),
                "matmul_class": e.key in MATMUL_OPS,
            }
        )
    rec.doc["summary"] = {
        "step_self_time_ms": total / 1e3 / max(args.repeat, 1),
        "matmul_class_pct": 100.0 * matmul / max(total, 1.0),
    }
    rec.note(
        f"self time per step {rec.doc['summary']['step_self_time_ms']:.1f} ms, "
        f"{rec.doc['summary']['matmul_class_pct']:.1f}% in matmul-class kernels"
    )
    finish(rec, rec.results, ["op", "calls", "self_ms_per_step", "self_pct", "matmul_class"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
