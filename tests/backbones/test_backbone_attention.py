"""Attention dispatch: backends agree with an explicit reference, masks follow the −10000 convention."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from fiber_backbones.attention import attention, resolve_backend, use_attention_backend


def reference(q, k, v, bias=None, key_padding_mask=None):
    """Float64 softmax attention with the reference's additive −10000 text padding."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.double()
    if key_padding_mask is not None:
        logits = logits + (~key_padding_mask).double()[:, None, None, :] * -10000.0
    return logits.softmax(-1) @ v


def qkv(b=3, h=2, m=5, n=6, d=8, dtype=torch.float32):
    return (
        torch.randn(b, h, m, d, dtype=dtype),
        torch.randn(b, h, n, d, dtype=dtype),
        torch.randn(b, h, n, d, dtype=dtype),
    )


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_matches_reference_fp32_with_bias_and_padding(backend: str) -> None:
    q, k, v = qkv()
    bias = torch.randn(1, 2, 5, 6)
    kpm = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False] * 6])  # last row fully padded
    for b, m in ((None, None), (bias, None), (None, kpm), (bias, kpm)):
        out = attention(q, k, v, bias=b, key_padding_mask=m, backend=backend)
        torch.testing.assert_close(out.double(), reference(q, k, v, b, m), atol=1e-5, rtol=1e-5)


def test_fully_padded_row_is_unmasked_attention_not_nan() -> None:
    q, k, v = qkv(b=1)
    kpm = torch.zeros(1, 6, dtype=torch.bool)
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, key_padding_mask=kpm, backend=backend)
        assert torch.isfinite(out).all()
        # −10000 on every key is a constant shift: identical to no mask at all.
        torch.testing.assert_close(out, attention(q, k, v, backend=backend), atol=1e-6, rtol=1e-6)


def test_padding_keys_do_not_influence_output() -> None:
    q, k, v = qkv(b=2)
    kpm = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = attention(q, k, v, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] = 1e3 * torch.randn_like(k2[0, :, 4:])
    v2[0, :, 4:] = 1e3
    torch.testing.assert_close(attention(q, k2, v2, key_padding_mask=kpm), out)


def test_sdpa_vs_eager_bf16_loose() -> None:
    q, k, v = qkv(b=2, m=16, n=16, d=32, dtype=torch.bfloat16)
    bias = torch.randn(1, 2, 16, 16)
    kpm = torch.tensor([[True] * 10 + [False] * 6, [True] * 16])
    a = attention(q, k, v, bias=bias, key_padding_mask=kpm, backend="sdpa")
    b = attention(q, k, v, bias=bias, key_padding_mask=kpm, backend="eager")
    assert a.dtype == b.dtype == torch.bfloat16
    ref = reference(q, k, v, bias, kpm)
    torch.testing.assert_close(a.double(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(b.double(), ref, atol=3e-2, rtol=3e-2)


def test_custom_scale_and_dropout_in_eval_is_exact() -> None:
    q, k, v = qkv()
    out = attention(q, k, v, scale=0.3, backend="eager")
    logits = (q @ k.transpose(-1, -2)) * 0.3
    torch.testing.assert_close(out, logits.softmax(-1) @ v, atol=1e-6, rtol=1e-6)


def test_resolution_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIBER_ATTN_BACKEND", raising=False)
    assert resolve_backend(None, device="cpu")[0] == "sdpa"
    assert resolve_backend("eager", device="cpu")[0] == "eager"
    monkeypatch.setenv("FIBER_ATTN_BACKEND", "eager")
    name, reason = resolve_backend(None, device="cpu")
    assert name == "eager" and "FIBER_ATTN_BACKEND" in reason
    assert resolve_backend("sdpa", device="cpu")[0] == "sdpa"  # explicit request beats the environment
    with use_attention_backend("sdpa"):
        name, reason = resolve_backend("eager", device="cpu")
        assert name == "sdpa" and "use_attention_backend" in reason
        with use_attention_backend("eager"):
            assert resolve_backend(None, device="cpu")[0] == "eager"
        assert resolve_backend(None, device="cpu")[0] == "sdpa"


def test_bad_names_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="flash9"), use_attention_backend("flash9"):
        pass
    monkeypatch.setenv("FIBER_ATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FIBER_ATTN_BACKEND"):
        resolve_backend(None, device="cpu")


def test_xformers_request_falls_back_with_reason() -> None:
    # on the CPU xformers never runs (not importable, or no CPU kernels): the request falls back with the reason
    name, reason = resolve_backend("xformers", device="cpu")
    assert name == "sdpa" and "falling back" in reason
    q, k, v = qkv()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = attention(q, k, v, backend="xformers")
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_export_selects_eager() -> None:
    q, k, v = qkv()
    seen = []

    class Attn(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            seen.append(resolve_backend("sdpa", device="cpu")[0])
            return attention(q, k, v, backend="sdpa")

    exported = torch.export.export(Attn(), (q, k, v))
    assert seen == ["eager"]
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("scaled_dot_product" in op for op in ops)
    torch.testing.assert_close(exported.module()(q, k, v), attention(q, k, v), atol=1e-6, rtol=1e-6)


@pytest.mark.xformers
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float16, 2e-2), (torch.bfloat16, 3e-2)])
def test_xformers_matches_sdpa(dtype: torch.dtype, tol: float) -> None:
    dev = "cuda"
    q, k, v = (t.to(dev) for t in qkv(b=3, h=4, m=33, n=21, d=32, dtype=dtype))
    kpm = (torch.arange(21)[None, :] < torch.tensor([[21], [7], [0]])).to(dev)
    bias = torch.randn(1, 4, 33, 21, device=dev)
    for b, m in ((None, kpm), (bias, None), (bias, kpm)):
        x = attention(q, k, v, bias=b, key_padding_mask=m, backend="xformers")
        s = attention(q, k, v, bias=b, key_padding_mask=m, backend="sdpa")
        torch.testing.assert_close(x.float(), s.float(), atol=tol, rtol=tol)


class _FakeBlockDiagonalMask:
    """CPU stand-in for ``xformers.ops.fmha.BlockDiagonalMask`` (records the per-sample lengths)."""

    def __init__(self, q_seqlen: list[int], kv_seqlen: list[int]) -> None:
        self.q_seqlen, self.kv_seqlen = q_seqlen, kv_seqlen

    @classmethod
    def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int]) -> _FakeBlockDiagonalMask:
        return cls(list(q_seqlen), list(kv_seqlen))


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    """Dense re-statement of xformers' semantics on [B, M, H, K] tensors."""
    assert p == 0.0
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))  # [B, H, M, K]
    logits = qh @ kh.transpose(-1, -2) * scale
    if isinstance(attn_bias, _FakeBlockDiagonalMask):
        assert q.shape[0] == 1 and k.shape[1] == sum(attn_bias.kv_seqlen)
        allowed = torch.zeros(q.shape[1], k.shape[1], dtype=torch.bool)
        q0 = k0 = 0
        for mq, nk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
            allowed[q0 : q0 + mq, k0 : k0 + nk] = True
            q0, k0 = q0 + mq, k0 + nk
        logits = logits.masked_fill(~allowed, float("-inf"))
    elif attn_bias is not None:
        assert attn_bias.dtype == q.dtype and attn_bias.stride(-2) % 8 == 0  # aligned storage
        logits = logits + attn_bias.double()
    return (logits.softmax(-1) @ vh).transpose(1, 2).to(q.dtype)


def test_xformers_glue_with_fake_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing, BlockDiagonalMask lengths and aligned dense bias, checked against a CPU stand-in of xformers."""
    import importlib
    import sys
    import types

    attn_mod = importlib.import_module("fiber_backbones.attention")  # the package re-exports the function

    fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
    ops: Any = types.ModuleType("xformers.ops")  # a stand-in module: attributes set below
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.fmha = fmha
    pkg: Any = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = qkv(b=3, m=5, n=6)
    kpm = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [False] * 6])
    bias = torch.randn(1, 2, 5, 6)
    for b, m in ((None, kpm), (bias, None), (bias, kpm), (None, None)):
        fixed = attn_mod._fix_padding(m)
        out = attn_mod._xformers(q, k, v, b, fixed, 0.0, 1 / math.sqrt(8))
        torch.testing.assert_close(out.double(), reference(q, k, v, b, m), atol=1e-5, rtol=1e-5)
    # A non-prefix padding mask cannot be packed: it goes through the dense aligned bias instead.
    holes = torch.tensor([[True, False, True, True, False, True]] * 3)
    out = attn_mod._xformers(q, k, v, None, holes, 0.0, 1 / math.sqrt(8))
    torch.testing.assert_close(out.double(), reference(q, k, v, None, holes), atol=1e-5, rtol=1e-5)
