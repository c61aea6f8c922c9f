"""Attention backends on the backbone's real shapes: time, peak memory, and whether the logits are materialised.

Cases (``fiber-base`` at 384 px unless ``--quick``, which scales every width and size down):

- ``swin_s{0..3}``: window attention of each Swin stage, ``B·nW`` windows of ``w² = 144`` tokens, head dim 32,
  with the relative-position bias (a parameter, so it needs a gradient in training) plus the shift mask,
  folded into the head axis exactly as :class:`fiber_backbones.swin.WindowAttention` does;
- ``text_self_L40`` / ``text_self_L256``: text self-attention, 12 heads × 64, padded batch with variable real
  lengths (key padding mask);
- ``i2t``: image-to-text cross-attention of the fused stage (24×24 = 576 image queries, text keys with padding);
- ``t2i``: text-to-image cross-attention (text queries, 576 image keys, no mask).

Backends: ``sdpa`` and ``eager`` through :func:`fiber_backbones.attention.attention`, ``xformers`` on CUDA, and
``torch_sdpa`` = a direct call of ``F.scaled_dot_product_attention`` with the same dense mask (what the ``sdpa``
backend did before it learned to skip SDPA's CPU math fallback). ``logits_materialised`` is read from a profiler
trace: ``True`` when a softmax over the full ``[B, H, M, N]`` logits ran (explicit-matmul attention).

Usage::

    python benchmarks/attention.py [--batch 2] [--modes fwd train]
    python benchmarks/attention.py --quick
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import Recorder, base_parser, dtype_of, finish, measure_peak_memory, setup, time_fn
from torch import Tensor
from torch.profiler import profile

from fiber_backbones.attention import attention, xformers_available
from fiber_backbones.swin import relative_position_index, shift_window_mask

SOFTMAX_OPS = {"aten::_softmax", "aten::_safe_softmax", "aten::softmax", "aten::_masked_softmax"}

FULL = {"img": 384, "window": 12, "embed": 128, "heads": (4, 8, 16, 32), "text_dim": 768, "text_heads": 12}
QUICK = {"img": 128, "window": 4, "embed": 32, "heads": (1, 2, 4, 8), "text_dim": 64, "text_heads": 2}


def _lengths(batch: int, length: int) -> Tensor:
    # real lengths spread from L down to L/4: a padded batch of captions of different lengths
    return torch.linspace(length, max(length // 4, 1), batch).round().long()


def build_cases(geo: dict[str, Any], batch: int, text_lens: list[int], fused_stage: int) -> list[dict[str, Any]]:
    """Shape descriptions of every case (no tensors yet)."""
    cases: list[dict[str, Any]] = []
    w = geo["window"]
    for s, heads in enumerate(geo["heads"]):
        grid = geo["img"] // 4 // 2**s
        win = min(w, grid)
        nw = (grid // win) ** 2
        shift = grid > win
        cases.append(
            {
                "case": f"swin_s{s}",
                "kind": "window",
                "b": batch * nw if not shift else batch,
                "h": heads * (nw if shift else 1),
                "m": win * win,
                "n": win * win,
                "d": 32 if geo is FULL else geo["embed"] * 2**s // heads,
                "window": win,
                "heads": heads,
                "nw": nw,
                "shift": shift,
                "grid": grid,
            }
        )
    td, th = geo["text_dim"], geo["text_heads"]
    for length in text_lens:
        cases.append({"case": f"text_self_L{length}", "kind": "pad", "b": batch, "h": th, "m": length, "n": length})
        cases[-1]["d"] = td // th
    grid = geo["img"] // 4 // 2**fused_stage
    heads = geo["heads"][fused_stage]
    dim = geo["embed"] * 2**fused_stage
    cases.append(
        {"case": f"i2t_L{text_lens[0]}", "kind": "pad", "b": batch, "h": heads, "m": grid * grid, "n": text_lens[0]}
    )
    cases[-1]["d"] = dim // heads
    cases.append(
        {"case": f"t2i_L{text_lens[0]}", "kind": "none", "b": batch, "h": th, "m": text_lens[0], "n": grid * grid}
    )
    cases[-1]["d"] = td // th
    return cases


def make_tensors(case: dict[str, Any], dtype: torch.dtype, device: torch.device, grad: bool) -> dict[str, Any]:
    """q/k/v ``[B, H, M|N, D]``, the bias parameter and/or the padding mask of ``case``."""
    g = torch.Generator().manual_seed(0)
    b, h, m, n, d = case["b"], case["h"], case["m"], case["n"], case["d"]
    t: dict[str, Any] = {
        name: torch.randn(b, h, size, d, generator=g).to(device, dtype).requires_grad_(grad)
        for name, size in (("q", m), ("k", n), ("v", n))
    }
    t["table"] = None
    t["kpm"] = None
    if case["kind"] == "window":
        win = case["window"]
        t["table"] = (
            (0.02 * torch.randn((2 * win - 1) ** 2, case["heads"], generator=g)).to(device).requires_grad_(grad)
        )
        t["index"] = relative_position_index(win, device=device).reshape(-1)
        if case["shift"]:
            t["mask"] = shift_window_mask(case["grid"], case["grid"], win, win // 2, device=device)
    elif case["kind"] == "pad":
        lengths = _lengths(b, n).to(device)
        t["kpm"] = torch.arange(n, device=device)[None, :] < lengths[:, None]
    return t


def _bias(case: dict[str, Any], t: dict[str, Any], dtype: torch.dtype) -> Tensor | None:
    # rebuilt inside the timed region, as in the model (gather + shift mask are part of the attention cost)
    if t["table"] is None:
        return None
    m, heads = case["m"], case["heads"]
    bias = t["table"][t["index"]].view(m, m, heads).permute(2, 0, 1).to(dtype)
    if "mask" in t:
        return (bias[None] + t["mask"][:, None].to(dtype)).reshape(1, case["nw"] * heads, m, m)
    return bias[None]


def make_fn(
    case: dict[str, Any], t: dict[str, Any], dtype: torch.dtype, backend: str, train: bool
) -> Callable[[], Any]:
    """One attention call (forward, or forward + backward when ``train``)."""

    def run() -> Tensor:
        bias = _bias(case, t, dtype)
        if backend == "torch_sdpa":
            kpm = t["kpm"]
            mask = bias
            if kpm is not None:
                mask = kpm[:, None, None, :]
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=mask)
        return attention(t["q"], t["k"], t["v"], bias=bias, key_padding_mask=t["kpm"], backend=backend)

    def fwd() -> Any:
        with torch.no_grad():
            return run()

    def step() -> None:
        out = run()
        out.float().sum().backward()
        for name in ("q", "k", "v", "table"):
            if t[name] is not None:
                t[name].grad = None

    return step if train else fwd


def logits_materialised(fn: Callable[[], Any]) -> bool:
    """Whether a softmax kernel (explicit logits) ran inside ``fn`` (flash / memory-efficient kernels have none)."""
    with profile() as prof:
        fn()
    return any(e.key in SOFTMAX_OPS for e in prof.key_averages())


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="images / captions per batch (default 2, quick 1)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default fp32 bf16 (CPU) / bf16 fp16 (CUDA)")
    p.add_argument("--modes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--text-lens", type=int, nargs="+", default=None, help="default 40 256 (quick 16 40)")
    args = p.parse_args(argv)
    dev = setup(args, repeat=(10, 2), warmup=(2, 1))
    geo = QUICK if args.quick else FULL
    batch = args.batch or (1 if args.quick else 2)
    text_lens = args.text_lens or ([16] if args.quick else [40, 256])
    dtypes = args.dtypes or (["bf16"] if args.quick else ["fp32", "bf16"] if dev.type == "cpu" else ["bf16", "fp16"])
    backends = args.backends or (
        ["sdpa", "eager"]
        + ([] if args.quick else ["torch_sdpa"])
        + (["xformers"] if dev.type == "cuda" and xformers_available() else [])
    )
    cases = build_cases(geo, batch, text_lens, fused_stage=2)
    rec = Recorder(
        "attention",
        args,
        {
            "geometry": geo,
            "batch": batch,
            "text_lens": text_lens,
            "dtypes": dtypes,
            "backends": backends,
            "cases": cases,
        },
    )
    for case in cases:
        for dname in dtypes:
            dt = dtype_of(dname)
            for mode in args.modes:
                train = mode == "train"
                t = make_tensors(case, dt, dev, grad=train)
                for backend in backends:
                    fn = make_fn(case, t, dt, backend, train)
                    with measure_peak_memory(dev) as mem:
                        fn()
                    tm = time_fn(fn, dev, args.repeat, max(args.warmup - 1, 0))
                    # attention FLOPs: QK^T and PV, 2·B·H·M·N·D each; backward ≈ 2.5x forward (dQ, dK, dV, dS)
                    flops = 4.0 * case["b"] * case["h"] * case["m"] * case["n"] * case["d"] * (3.5 if train else 1.0)
                    row = {
                        "case": case["case"],
                        "shape": f"B{case['b']} H{case['h']} M{case['m']} N{case['n']} D{case['d']}",
                        "dtype": dname,
                        "mode": mode,
                        "backend": backend,
                        **tm,
                        "gflops": flops / tm["min_s"] / 1e9,
                        "logits_mib": round(case["b"] * case["h"] * case["m"] * case["n"] * 4 / 2**20, 2),
                        "logits_materialised": logits_materialised(fn) if dev.type == "cpu" else None,
                        **mem,
                    }
                    rec.add(row)
    rec.note("logits_mib = size of a float32 [B, H, M, N] logits tensor, for scale")
    rec.note(
        "CPU: SDPA's flash kernel has no gradient for a float bias, so window attention in training materialises "
        "its (small, w^2 x w^2) logits on every backend; inference and padding-only masks use the flash kernel"
    )
    finish(
        rec,
        rec.results,
        [
            "case",
            "shape",
            "dtype",
            "mode",
            "backend",
            "median_s",
            "min_s",
            "cpu_min_s",
            "peak_mem_mib",
            "logits_materialised",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
