"""Fusion in the backbone (FIBER) vs fusion on top (METER-style co-attention stack): params, FLOPs, time, memory.

The paper's efficiency claim: inserting gated cross-attention into the top blocks of both towers costs far less
than a separate fusion encoder on top of them. Both sides here share the *same* Swin + RoBERTa towers:

- ``fiber``: :class:`fiber_backbones.FiberBackbone` with its fusion schedule on (``fuse=True``);
- ``meter_top``: the towers run uni-modally (``fuse=False``; FIBER's cross-attention modules are idle and are
  not counted), then image tokens and text states are projected to width ``D`` (768 for fiber-base) and go
  through 6 co-attention layers defined below, one per modality and layer: self-attention → cross-attention to
  the other modality's pre-layer states → FFN (4·D), each post-LN with a residual, as in METER's fusion module.

Both stacks call :func:`fiber_backbones.attention.attention`, so the attention kernels are the same.

Usage::

    python benchmarks/fusion_placement.py [--config coarse384] [--batch 2] [--dtype bf16]
    python benchmarks/fusion_placement.py --quick
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    Recorder,
    base_parser,
    count_flops,
    dtype_of,
    finish,
    measure_peak_memory,
    setup,
    time_fn,
)
from backbone import CONFIGS, make_inputs
from torch import Tensor, nn

from fiber_backbones import FiberBackbone, TextInputs, create_backbone
from fiber_backbones.attention import attention


class _MHA(nn.Module):
    """Multi-head attention ``x [B, M, D]`` → ``kv [B, N, D]`` with an optional key padding mask ``[B, N]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv: Tensor, kpm: Tensor | None, backend: str) -> Tensor:
        b, m, d = x.shape
        h = self.heads
        q = self.q(x).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, key_padding_mask=kpm, backend=backend)
        return self.out(out.transpose(1, 2).reshape(b, m, d))


class _CoLayer(nn.Module):
    """One modality's half of a co-attention layer: SA → LN → CA → LN → FFN → LN (post-LN, residuals)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.sa = _MHA(dim, heads)
        self.ca = _MHA(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, x_mask: Tensor | None, other: Tensor, other_mask: Tensor | None, backend: str
    ) -> Tensor:
        x = self.ln1(x + self.sa(x, x, x_mask, backend))
        x = self.ln2(x + self.ca(x, other, other_mask, backend))
        return self.ln3(x + self.ffn(x))


class MeterStyleFusion(nn.Module):
    """METER-style fusion encoder on top of two towers: projections to ``dim`` and ``depth`` co-attention layers.

    Args:
        image_dim: width of the image tokens ``[B, N, C_img]``.
        text_dim: width of the text states ``[B, L, C_txt]``.
        dim: fusion width ``D``.
        heads: attention heads.
        depth: co-attention layers.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int, heads: int, depth: int = 6) -> None:
        super().__init__()
        self.backend = "auto"
        self.image_proj = nn.Linear(image_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_layers = nn.ModuleList(_CoLayer(dim, heads) for _ in range(depth))
        self.text_layers = nn.ModuleList(_CoLayer(dim, heads) for _ in range(depth))

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``image [B, N, C_img]``, ``text [B, L, C_txt]``, ``text_mask [B, L]`` → ``([B, N, D], [B, L, D])``."""
        x, t = self.image_proj(image), self.text_proj(text)
        for li, lt in zip(self.image_layers, self.text_layers):
            # both modalities read the pre-layer states of the other (parallel update)
            x, t = li(x, None, t, text_mask, self.backend), lt(t, text_mask, x, None, self.backend)
        return x, t


class FusionOnTop(nn.Module):
    """FIBER's towers run uni-modally, followed by :class:`MeterStyleFusion`."""

    def __init__(self, backbone: FiberBackbone, depth: int = 6) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.text_dim
        self.fusion = MeterStyleFusion(backbone.image_dim, d, d, backbone.config.text.num_heads, depth)

    def forward(self, pixels: Tensor, text: TextInputs) -> tuple[Tensor, Tensor]:
        out = self.backbone(pixels, text, fuse=False)
        assert out.text is not None
        return self.fusion(out.image.tokens, out.text.hidden, text.attention_mask)


def _set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, FiberBackbone):
            m.set_attention_backend(backend)
        if isinstance(m, MeterStyleFusion):
            m.backend = backend


def _fns(
    model: nn.Module, kind: str, pixels: Tensor, text: TextInputs, dtype: torch.dtype, dev: torch.device
) -> dict[str, Callable[[], Any]]:
    def autocast() -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype=dtype)

    def run() -> tuple[Tensor, Tensor]:
        if kind == "fiber":
            out = model(pixels, text, fuse=True)
            return out.image.tokens, out.text.hidden
        return model(pixels, text)

    def fwd() -> Any:
        model.eval()
        with torch.no_grad(), autocast():
            return run()

    def train() -> None:
        model.train()
        with autocast():
            img, txt = run()
            loss = img.float().mean() + txt.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {"fwd": fwd, "train": train}


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--config", default=None, choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default bf16 (quick: fp32)")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--modes", nargs="+", default=["fwd", "train"], choices=["fwd", "train"])
    p.add_argument("--depth", type=int, default=6, help="co-attention layers of the on-top stack")
    args = p.parse_args(argv)
    dev = setup(args, repeat=(5, 2), warmup=(2, 1))
    cname = args.config or ("tiny" if args.quick else "coarse384")
    batch = args.batch or (2 if args.quick else 1)
    dname = args.dtype or ("fp32" if args.quick else "bf16")
    dt = dtype_of(dname)
    c = CONFIGS[cname]
    rec = Recorder(
        "fusion_placement",
        args,
        {"config": cname, "batch": batch, "dtype": dname, "backend": args.backend, "depth": args.depth, **c},
    )
    torch.manual_seed(0)
    backbone = create_backbone(c["model"], **c["overrides"]).to(dev)
    fusion_params = {id(p) for p in backbone.fusion_parameters()}
    tower_params = sum(p.numel() for p in backbone.parameters() if id(p) not in fusion_params)
    fiber_fusion = sum(p.numel() for p in backbone.fusion_parameters())
    on_top = FusionOnTop(backbone, args.depth).to(dev)
    top_params = sum(p.numel() for p in on_top.fusion.parameters())
    pixels, text = make_inputs(batch, c["hw"], c["text_len"], backbone.config.text.vocab_size, dev)
    models = {"fiber": (backbone, fiber_fusion), "meter_top": (on_top, top_params)}
    for kind, (model, fparams) in models.items():
        _set_backend(model, "eager")
        flops = {m: count_flops(_fns(model, kind, pixels, text, torch.float32, dev)[m]) for m in args.modes}
        _set_backend(model, args.backend)
        fns = _fns(model, kind, pixels, text, dt, dev)
        for mode in args.modes:
            with measure_peak_memory(dev) as mem:
                fns[mode]()
            t = time_fn(fns[mode], dev, args.repeat, max(args.warmup - 1, 0))
            rec.add(
                {
                    "fusion": kind,
                    "mode": mode,
                    "tower_params_m": tower_params / 1e6,
                    "fusion_params_m": fparams / 1e6,
                    "total_params_m": (tower_params + fparams) / 1e6,
                    "gflop": flops[mode] / 1e9,
                    **t,
                    **mem,
                }
            )
    by = {(r["fusion"], r["mode"]): r for r in rec.results}
    for mode in args.modes:
        f, m = by[("fiber", mode)], by[("meter_top", mode)]
        rec.note(
            f"{mode}: fusion-on-top / FIBER = {m['gflop'] / f['gflop']:.2f}x FLOPs, "
            f"{m['cpu_min_s'] / f['cpu_min_s']:.2f}x CPU time, {m['min_s'] / f['min_s']:.2f}x wall time; "
            f"fusion params {m['fusion_params_m']:.1f}M vs {f['fusion_params_m']:.1f}M"
        )
    finish(
        rec,
        rec.results,
        [
            "fusion",
            "mode",
            "fusion_params_m",
            "total_params_m",
            "gflop",
            "median_s",
            "min_s",
            "cpu_min_s",
            "peak_mem_mib",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
