"""xformers usability is decided by what it runs: stand-in xformers modules on CPU prove the fallback and the
per-case speed choice (the real kernels are CUDA-only; CI has no GPU)."""

from __future__ import annotations

import importlib
import math
import sys
import types
import warnings
from typing import Any

import pytest
import torch
from bb_helpers import make_text, randomize_gates
from test_backbone_attention import _fake_memory_efficient_attention, _FakeBlockDiagonalMask, qkv, reference

from fiber_backbones import create_backbone
from fiber_backbones.cli import main as cli_main

attn_mod = importlib.import_module("fiber_backbones.attention")  # the package re-exports the function

NO_OPERATOR = "No operator found for `memory_efficient_attention_forward` with inputs:\n query: shape=(1, 2, 3, 4)"


class _Calls:
    def __init__(self) -> None:
        self.n = 0


def _install(monkeypatch: pytest.MonkeyPatch, kernel) -> None:
    """Put a stand-in ``xformers`` package in ``sys.modules`` and start every attention cache afresh."""
    ops: Any = types.ModuleType("xformers.ops")  # a stand-in module: attributes set below
    ops.memory_efficient_attention = kernel
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
    pkg: Any = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.delenv("FIBER_ATTN_BACKEND", raising=False)
    for name, fresh in (("_XFORMERS_OK", None), ("_PROBES", {}), ("_TUNED", {}), ("_REPORT", {}), ("_warned", set())):
        monkeypatch.setattr(attn_mod, name, fresh)
    # let "auto" consider xformers on the CPU, as it does on CUDA
    monkeypatch.setattr(attn_mod, "AUTO_XFORMERS_DEVICES", ("cuda", "cpu"))


def _refusing(calls: _Calls):
    def kernel(*args, **kwargs):
        calls.n += 1
        raise NotImplementedError(NO_OPERATOR)

    return kernel


def _working(calls: _Calls):
    def kernel(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.n += 1
        return _fake_memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=0.0, scale=scale)

    return kernel


def test_auto_falls_back_to_sdpa_when_xformers_has_no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _Calls()
    _install(monkeypatch, _refusing(calls))
    q, k, v = qkv(b=3, m=5, n=6)
    kpm = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [False] * 6])
    bias = torch.randn(1, 2, 5, 6)
    for b, m in ((None, kpm), (bias, None), (bias, kpm), (None, None)):
        for _ in range(2):
            out = attn_mod.attention(q, k, v, bias=b, key_padding_mask=m)
            torch.testing.assert_close(out.double(), reference(q, k, v, b, m), atol=1e-5, rtol=1e-5)
    assert calls.n == 4  # one refused probe per case, none for the repeated calls
    report = attn_mod.attention_report()
    assert len(report) == 4 and all(r["backend"] == "sdpa" for r in report)
    assert all("NotImplementedError: No operator found" in r["reason"] for r in report)
    assert {r["case"] for r in report} == {
        "cpu float32 d=8 padding no-grad",
        "cpu float32 d=8 bias no-grad",
        "cpu float32 d=8 bias padding no-grad",
        "cpu float32 d=8 no-grad",
    }


def test_explicit_xformers_request_warns_once_and_trains_a_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _Calls()
    _install(monkeypatch, _refusing(calls))
    torch.manual_seed(0)
    model = create_backbone("fiber-tiny", attention_backend="xformers").train()
    randomize_gates(model)
    ref = create_backbone("fiber-tiny", attention_backend="sdpa").train()
    ref.load_state_dict(model.state_dict())
    px, text = torch.randn(2, 3, 64, 64), make_text([9, 5], vocab=1000)
    losses, grads = [], []
    for m in (model, ref):
        torch.manual_seed(1)  # same dropout / drop-path draws
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m(px, text)
        loss = out.image.tokens.square().mean() + out.text.hidden.square().mean()
        loss.backward()
        losses.append(loss.detach())
        grad = m.image_encoder.block(0, 0).attn.relative_position_bias_table.grad
        assert grad is not None
        grads.append(grad.clone())
        if m is model:
            fallbacks = [str(w.message) for w in caught if "falling back to torch SDPA" in str(w.message)]
            assert fallbacks and len(fallbacks) == len(set(fallbacks))  # once per distinct case
            assert all("NotImplementedError" in f and "config/argument asked for xformers" in f for f in fallbacks)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    probed = calls.n
    model(px, text).image.tokens.sum().backward()  # probes are cached: no new stand-in call
    assert calls.n == probed


def test_info_prints_the_fallback_reason(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    _install(monkeypatch, _refusing(_Calls()))
    assert cli_main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "xformers importable: True" in out
    assert "Swin window attention" in out and "sdpa" in out
    assert "NotImplementedError: No operator found for `memory_efficient_attention_forward`" in out


@pytest.mark.parametrize("faster", ["xformers", "sdpa"])
def test_auto_keeps_the_faster_backend_per_case(monkeypatch: pytest.MonkeyPatch, faster: str) -> None:
    calls = _Calls()
    _install(monkeypatch, _working(calls))
    timed: list[str] = []

    def fake_measure(name, fn, device, repeat=3):
        fn()  # the timed callable must run
        timed.append(name)
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(attn_mod, "_measure", fake_measure)
    q, k, v = qkv(b=2, m=5, n=6)
    bias = torch.randn(1, 2, 5, 6, requires_grad=True)
    q.requires_grad_(True)
    for _ in range(3):
        out = attn_mod.attention(q, k, v, bias=bias)
        out.sum().backward()
    assert sorted(timed) == ["sdpa", "xformers"]  # timed once for this case and shape
    (entry,) = attn_mod.attention_report()
    assert entry["backend"] == faster and entry["case"] == "cpu float32 d=8 bias_grad train"
    assert f"{faster} 1000.000 ms" in entry["reason"]
    n = calls.n
    attn_mod.attention(q, k, v, bias=bias)
    assert calls.n == n + (faster == "xformers")  # the kept backend runs the call
    q2, k2, v2 = qkv(b=4, m=5, n=6)  # a new shape of the same case is timed on its own
    attn_mod.attention(q2.requires_grad_(True), k2, v2, bias=bias)
    assert len(timed) == 4


def test_probe_rejects_a_kernel_that_computes_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(q, k, v, attn_bias=None, p=0.0, scale=None):
        return _fake_memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=0.0, scale=scale) * 2

    _install(monkeypatch, wrong)
    why = attn_mod.probe_xformers(attn_mod.AttentionCase("cpu", torch.float32, 8, "bias", False))
    assert why is not None and "differs from the eager kernel" in why
    name, reason = attn_mod.resolve_backend(
        "xformers", device="cpu", case=attn_mod.AttentionCase("cpu", torch.float32, 8)
    )
    assert name == "sdpa" and "differs" in reason and reason.endswith("falling back to torch SDPA")


def test_probe_leaves_the_rng_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, _working(_Calls()))
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert (
        attn_mod.probe_xformers(attn_mod.AttentionCase("cpu", torch.float32, 16, "bias_grad", True, False, True))
        is None
    )
    torch.testing.assert_close(torch.rand(3), want)
    assert math.isfinite(float(want.sum()))
