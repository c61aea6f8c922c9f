"""FIBER backbone forward / training-step time, peak memory and model FLOPs utilisation (MFU).

Configurations (``--configs``):

- ``coarse384``: ``fiber-base`` coarse variant at 384 px, text padded to 40 tokens (coarse pre-training).
- ``coarse576``: the same at 576 px (window 18; the high-resolution coarse fine-tuning size).
- ``fine800x1333``: ``fiber-base`` ``fine_v2`` variant at 800×1333, text 256 tokens (fine-grained pre-training).
- ``tiny``: ``fiber-tiny`` at 64 px, text 16 (the ``--quick`` default).

For each configuration, dtype (fp32 / bf16 autocast), attention backend (``sdpa``, ``eager``; ``xformers`` when
it runs on CUDA; ``torch_sdpa`` on request: SDPA called directly for every attention, i.e. the ``sdpa`` backend
before it routed SDPA's CPU math-fallback cases to the eager kernel) and batch size it times

- ``fwd``: a no-grad fused forward in eval mode;
- ``train``: forward + scalar loss + backward in train mode (dropout and stochastic depth on), grads zeroed.

FLOPs are counted once per (configuration, batch, mode) with ``FlopCounterMode`` on the eager backend (the same
matmuls SDPA performs). MFU is ``flops / min_s / peak`` where ``peak`` is the best measured matmul rate of that
dtype from ``results/matmul_peak.json`` (run ``matmul_peak.py`` first; without it MFU is left empty).
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the sampled RSS delta on CPU.

Usage::

    python benchmarks/backbone.py                         # the three fiber-base sizes, batch 1 and 2
    python benchmarks/backbone.py --configs coarse384 --dtypes bf16 --modes train --batch 2
    python benchmarks/backbone.py --quick
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    Recorder,
    base_parser,
    count_flops,
    dtype_of,
    finish,
    load_matmul_peak,
    measure_peak_memory,
    setup,
    sync,
    time_fn,
)
from torch import Tensor

from fiber_backbones import TextInputs, create_backbone
from fiber_backbones.attention import xformers_available

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"model": "fiber-tiny", "overrides": {}, "hw": (64, 64), "text_len": 16},
    "coarse384": {"model": "fiber-base", "overrides": {}, "hw": (384, 384), "text_len": 40},
    "coarse576": {"model": "fiber-base", "overrides": {"swin.img_size": 576}, "hw": (576, 576), "text_len": 40},
    "fine800x1333": {
        "model": "fiber-base",
        "overrides": {"variant": "fine_v2"},
        # 1333 is padded to a multiple of 32 by the data pipeline (size_divisibility), as in the reference
        "hw": (800, 1344),
        "text_len": 256,
    },
}


# the module (``fiber_backbones.attention`` as an attribute is the re-exported function)
fb_attention = importlib.import_module("fiber_backbones.attention")


def _direct_sdpa(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    # F.scaled_dot_product_attention for every call: what the "sdpa" backend did before it routed the CPU cases
    # that SDPA runs through its math fallback (a bias that needs a gradient, dropout) to the eager kernel
    mask = None if bias is None else bias.to(q.dtype)
    if kpm is not None:
        keep = kpm[:, None, None, :]
        mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


@contextlib.contextmanager
def unrouted_sdpa(enabled: bool) -> Iterator[None]:
    """Benchmark-only: make the ``sdpa`` backend call SDPA directly (the ``torch_sdpa`` pseudo-backend)."""
    if not enabled:
        yield
        return
    saved = fb_attention._IMPLS["sdpa"]
    fb_attention._IMPLS["sdpa"] = _direct_sdpa
    try:
        yield
    finally:
        fb_attention._IMPLS["sdpa"] = saved


def make_inputs(
    batch: int, hw: tuple[int, int], text_len: int, vocab: int, device: torch.device
) -> tuple[Tensor, TextInputs]:
    """Random pixels ``[B, 3, H, W]`` and text ``[B, L]`` whose real lengths vary from ``L`` down to ``L/2``."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, *hw, generator=g)
    ids = torch.randint(3, vocab, (batch, text_len), generator=g)
    lengths = torch.linspace(text_len, max(text_len // 2, 2), batch).round().long()
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, 1)
    return pixels.to(device), TextInputs(ids, mask).to(device)


def step_fns(
    model: torch.nn.Module, pixels: Tensor, text: TextInputs, dtype: torch.dtype, device: torch.device
) -> dict[str, Callable[[], Any]]:
    """The timed callables: ``fwd`` (eval, no grad) and ``train`` (forward + backward)."""

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def fwd() -> Any:
        model.eval()
        with torch.no_grad(), autocast():
            return model(pixels, text)

    def train() -> None:
        model.train()
        with autocast():
            out = model(pixels, text)
            loss = out.image.tokens.float().mean() + out.text.hidden.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {"fwd": fwd, "train": train}


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="default: sdpa eager (+ xformers on CUDA); torch_sdpa = SDPA called directly for every attention",
    )
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 2)")
    p.add_argument("--modes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting (saves one eager run per config)")
    p.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="regional torch.compile of the backbone blocks (FiberBackbone.compile_blocks); 'off on' times both",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile on (e.g. max-autotune)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    args = p.parse_args(argv)
    dev = setup(args, repeat=(5, 2), warmup=(2, 1))
    configs = args.configs or (["tiny"] if args.quick else ["coarse384", "coarse576", "fine800x1333"])
    backends = args.backends or (
        ["sdpa", "eager"] + (["xformers"] if dev.type == "cuda" and xformers_available() else [])
    )
    batches = args.batch or ([2] if args.quick else [1, 2])
    rec = Recorder(
        "backbone",
        args,
        {
            "configs": {c: {**CONFIGS[c], "hw": list(CONFIGS[c]["hw"])} for c in configs},
            "dtypes": args.dtypes,
            "backends": backends,
            "batch": batches,
            "modes": args.modes,
            "compile": args.compile,
            "compile_mode": args.compile_mode,
            "compile_backend": args.compile_backend,
        },
    )
    peaks, peak_source = load_matmul_peak(dev, [dtype_of(d) for d in args.dtypes])
    rec.doc["settings"]["matmul_peak"] = {"source": peak_source, **peaks}
    rows = rec.results
    for cname in configs:
        c = CONFIGS[cname]
        torch.manual_seed(0)
        model = create_backbone(c["model"], **c["overrides"]).to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        vocab = model.config.text.vocab_size
        inputs = {b: make_inputs(b, c["hw"], c["text_len"], vocab, dev) for b in batches}
        flops: dict[int, dict[str, int]] = {}
        for b in batches:  # counted on the eager model, before any compilation
            flops[b] = {}
            if not args.no_flops:
                model.set_attention_backend("eager")
                fns = step_fns(model, *inputs[b], torch.float32, dev)
                flops[b] = {m: count_flops(fns[m]) for m in args.modes}
        for cmode in sorted(args.compile, key=lambda m: m == "on"):  # "off" first: compiling is in place
            compiled = cmode == "on"
            if compiled:
                opts = {"mode": args.compile_mode, "backend": args.compile_backend}
                model.compile_blocks(**{k: v for k, v in opts.items() if v})
            for b in batches:
                pixels, text = inputs[b]
                for dname in args.dtypes:
                    dt = dtype_of(dname)
                    for backend in backends:
                        if compiled and backend not in ("sdpa", "eager"):
                            continue  # compiled regions run SDPA or eager only
                        model.set_attention_backend("sdpa" if backend == "torch_sdpa" else backend)
                        fns = step_fns(model, pixels, text, dt, dev)
                        for mode in args.modes:
                            with unrouted_sdpa(backend == "torch_sdpa"):
                                t_compile = None
                                if compiled:  # the first call compiles: time it apart, keep it out of the memory
                                    t0 = time.perf_counter()
                                    fns[mode]()
                                    sync(dev)
                                    t_compile = time.perf_counter() - t0
                                # the first (warm-up) run is the one whose peak memory is measured
                                with measure_peak_memory(dev) as mem:
                                    fns[mode]()
                                t = time_fn(fns[mode], dev, args.repeat, max(args.warmup - 1, 0))
                            row: dict[str, Any] = {
                                "config": cname,
                                "model": c["model"],
                                "hw": f"{c['hw'][0]}x{c['hw'][1]}",
                                "text_len": c["text_len"],
                                "batch": b,
                                "dtype": dname,
                                "backend": backend,
                                "compile": compiled,
                                "mode": mode,
                                "params_m": round(n_params / 1e6, 2),
                                **t,
                                "samples_per_s": b / t["min_s"],
                                **mem,
                            }
                            if t_compile is not None:
                                row["first_call_s"] = t_compile
                            if mode in flops[b]:
                                row["gflop"] = flops[b][mode] / 1e9
                                row["achieved_gflops"] = flops[b][mode] / t["min_s"] / 1e9
                                peak = peaks[str(dt).removeprefix("torch.")]
                                row["mfu_pct"] = 100.0 * row["achieved_gflops"] / peak["gflops"]
                                # CPU-time based MFU: robust to other jobs on the machine when threads == 1
                                row["mfu_cpu_pct"] = 100.0 * flops[b][mode] / t["cpu_min_s"] / 1e9 / peak["gflops_cpu"]
                            rec.add(row)
                            print(
                                f"{cname} b={b} {dname} {backend} compile={cmode} {mode}: median {t['median_s']:.4f}s "
                                f"min {t['min_s']:.4f}s cpu {t['cpu_min_s']:.4f}s mem {mem['peak_mem_mib']} MiB "
                                f"mfu {row.get('mfu_pct', float('nan')):.1f}% "
                                f"(cpu-time {row.get('mfu_cpu_pct', float('nan')):.1f}%)",
                                flush=True,
                            )
        del model
    rec.note(
        "mfu_pct = flops / min_s / best matmul rate of the same dtype; mfu_cpu_pct uses CPU time for both "
        "(robust to a shared machine only with --threads 1)"
    )
    if dev.type == "cpu":
        rec.note("CPU peak memory is a sampled RSS delta of one run (approximate, includes allocator caching)")
    finish(
        rec,
        rows,
        [
            "config",
            "batch",
            "dtype",
            "backend",
            "compile",
            "mode",
            "median_s",
            "min_s",
            "gflop",
            "achieved_gflops",
            "cpu_min_s",
            "mfu_pct",
            "mfu_cpu_pct",
            "peak_mem_mib",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
