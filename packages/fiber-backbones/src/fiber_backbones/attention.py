"""One attention entry point with interchangeable backends (docs/reference/design.md §8; masks of docs/reference/architecture.md §2.1, §3, §5, §6).

:func:`attention` computes ``softmax(q·kᵀ·scale + bias + padding) · v`` on ``[B, H, M, D]`` tensors with one of
three backends:

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (import-guarded). Key padding is expressed as a
  ``BlockDiagonalMask`` built from the per-sample key lengths, with the keys packed, so no dense ``[B, H, M, N]``
  mask is built.
- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`; key padding is a broadcast boolean
  ``[B, 1, 1, N]`` mask and a float bias (Swin's relative-position bias) is SDPA's ``attn_mask``, so on CUDA the
  fused memory-efficient kernel runs it, gradient of the bias included. On CPU, where SDPA itself would fall
  back to its unfused math kernel (a float bias that needs a gradient, or attention dropout), the eager kernel
  below runs instead: same maths, fewer passes over the logits.
- ``"eager"``: explicit matmul + softmax (float32 accumulation inside the softmax kernel), traceable/exportable.
  It materialises the ``[B, H, M, N]`` logits.

Selection, from highest to lowest priority: the :func:`use_attention_backend` context manager, an explicit
``backend=`` argument (the model passes its config field), the ``FIBER_ATTN_BACKEND`` environment variable, then
``"auto"``. Tracing, ``torch.export`` and ONNX export always use eager; inside a ``torch.compile`` region
``"auto"`` and ``"xformers"`` use SDPA (the compiler's own kernels; no probing or timing while tracing).

Whether xformers can run is decided by what it actually runs, never by its import alone: for every
:class:`AttentionCase` (device, dtype, head dim, bias with or without gradient, key padding, dropout, gradient)
a tiny call of that signature, forward and, where the case trains, backward, is made once and cached
(:func:`probe_xformers`); an installed xformers without kernels for the case (e.g. a wheel built without CUDA)
falls back to SDPA with the reason. Under ``"auto"``, where xformers runs the case, both backends are timed once
on the first call of each shape and the faster one is kept for that shape. Every decision and its reason is
logged once per process and listed by :func:`attention_report` (``fiber-backbones info`` prints them).

Padding convention: ``key_padding_mask`` is a ``BoolTensor [B, N]`` with ``True`` for a real key. The reference
model adds −10000 to padded keys, which for a row whose keys are *all* padding is a constant shift that leaves the
softmax unchanged. We reproduce that exactly: a fully padded row attends to all of its keys as if unmasked, so no
backend ever produces NaN.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "AttentionCase",
    "attention",
    "attention_report",
    "current_backend_override",
    "probe_xformers",
    "resolve_backend",
    "use_attention_backend",
    "xformers_available",
]

BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "eager")
ENV_VAR = "FIBER_ATTN_BACKEND"
# device types on which "auto" considers xformers at all (its kernels are CUDA kernels)
AUTO_XFORMERS_DEVICES: tuple[str, ...] = ("cuda",)

logger = logging.getLogger(__name__)

_FALLBACK_SUFFIX = "; falling back to torch SDPA"
_override_stack: list[str] = []
_warned: set[str] = set()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown attention backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Force an attention backend inside a ``with`` block (overrides config fields and the environment).

    Args:
        name: ``"auto" | "xformers" | "sdpa" | "eager"``.
    """
    _override_stack.append(_check_name(name, "use_attention_backend"))
    try:
        yield
    finally:
        _override_stack.pop()


def current_backend_override() -> str | None:
    """Backend forced by the innermost :func:`use_attention_backend`, or ``None``."""
    return _override_stack[-1] if _override_stack else None


_XFORMERS_OK: bool | None = None


def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports (says nothing about kernels: see :func:`probe_xformers`); cached."""
    global _XFORMERS_OK
    if _XFORMERS_OK is None:
        try:
            # xformers is optional, not installed in the pinned dev venv (constraints.txt)
            import xformers.ops  # pyright: ignore[reportMissingImports]  # noqa: F401

            _XFORMERS_OK = True
        except Exception:
            _XFORMERS_OK = False
    return _XFORMERS_OK


def _is_exporting() -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if callable(is_exporting) and is_exporting():
        return True
    onnx = getattr(torch, "onnx", None)
    is_export = getattr(onnx, "is_in_onnx_export", None)
    return bool(is_export()) if callable(is_export) else False


@dataclass(frozen=True)
class AttentionCase:
    """Capability signature of one attention call: what decides whether a kernel exists for it.

    Attributes:
        device: device type (``"cuda"``, ``"cpu"``).
        dtype: dtype of ``q``/``k``/``v``.
        head_dim: ``D``.
        bias: ``"none"``, ``"bias"`` (a float bias without gradient) or ``"bias_grad"`` (one that needs it).
        padding: a key-padding mask is given.
        dropout: attention dropout is on.
        grad: the call is differentiated (gradient mode on and an input needs a gradient).
    """

    device: str
    dtype: torch.dtype
    head_dim: int
    bias: str = "none"
    padding: bool = False
    dropout: bool = False
    grad: bool = False

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, padding: bool, dropout_p: float) -> AttentionCase:
        """The case of a call with these inputs."""
        grad_on = torch.is_grad_enabled()
        bias_grad = bias is not None and bias.requires_grad and grad_on
        grad = grad_on and (q.requires_grad or k.requires_grad or v.requires_grad or bias_grad)
        kind = "none" if bias is None else ("bias_grad" if bias_grad else "bias")
        return cls(q.device.type, q.dtype, int(q.shape[-1]), kind, padding, dropout_p > 0.0, grad)

    def describe(self) -> str:
        """Short text such as ``cuda bfloat16 d=32 bias_grad padding train``."""
        parts = [self.device, str(self.dtype).removeprefix("torch."), f"d={self.head_dim}"]
        if self.bias != "none":
            parts.append(self.bias)
        if self.padding:
            parts.append("padding")
        if self.dropout:
            parts.append("dropout")
        parts.append("train" if self.grad else "no-grad")
        return " ".join(parts)


_PROBES: dict[AttentionCase, str | None] = {}
_TUNED: dict[tuple, tuple[str, str]] = {}
_REPORT: dict[str, tuple[str, str]] = {}


def _short(exc: BaseException) -> str:
    # first line of the error plus the first few distinct "why not" lines of xformers' operator dispatch
    lines = str(exc).strip().splitlines() or [""]
    head = lines[0].strip().removesuffix(":").removesuffix(" with inputs")
    inputs = ("query", "key ", "value", "attn_bias", "p ")
    details: list[str] = []
    for line in lines[1:]:
        text = line.strip()
        if line.startswith("    ") and not text.startswith(inputs) and text not in details:
            details.append(text)
    extra = f" ({'; '.join(details[:3])})" if details else ""
    return f"{type(exc).__name__}: {head}{extra}"[:400]


def probe_xformers(case: AttentionCase) -> str | None:
    """Run xformers once on tiny inputs of ``case`` (forward, and backward where the case trains).

    The result is cached per case. The output is also compared with the eager kernel, so a kernel that runs but
    computes something else counts as unusable. The global RNG state is left untouched.

    Returns:
        ``None`` when xformers runs the case correctly, else the reason it cannot (first line of the error).
    """
    if case in _PROBES:
        return _PROBES[case]
    if not xformers_available():
        _PROBES[case] = "xformers not importable"
        return _PROBES[case]
    try:
        why = _run_probe(case)
    except Exception as exc:  # any failure of the stand-in call means: not usable for this case
        why = _short(exc)
    _PROBES[case] = why
    return why


def _run_probe(case: AttentionCase) -> str | None:
    dev = torch.device(case.device)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=dev.type if dev.type != "cpu" else "cuda"):
        torch.manual_seed(0)
        b, h, m, n, d = 2, 2, 16, 16, case.head_dim
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=case.dtype) for s in (m, n, n))
        bias = None
        if case.bias != "none":
            bias = torch.randn(1, h, m, n, device=dev, dtype=case.dtype)
        masks: list[Tensor | None] = [None]
        if case.padding:
            prefix = torch.arange(n, device=dev)[None, :] < torch.tensor([[n], [n // 2 + 1]], device=dev)
            holes = torch.ones(b, n, dtype=torch.bool, device=dev)
            holes[:, 1::3] = False
            masks = [prefix, holes]  # packed (block-diagonal) and dense-bias forms of the xformers glue
        scale = 1.0 / math.sqrt(d)
        for kpm in masks:
            with torch.no_grad():
                got = _xformers(q, k, v, bias, kpm, 0.0, scale).float()
                want = _eager(q, k, v, bias, kpm, 0.0, scale).float()
            err = (got - want).norm() / want.norm().clamp_min(1e-6)
            tol = 1e-3 if case.dtype == torch.float32 else 3e-2
            if not bool(torch.isfinite(got).all()) or float(err) > tol:
                return f"output differs from the eager kernel (relative error {float(err):.2e})"
            if case.grad or case.dropout:
                with torch.enable_grad():
                    qg, kg, vg = (t.detach().requires_grad_(case.grad) for t in (q, k, v))
                    bg = None if bias is None else bias.detach().requires_grad_(case.bias == "bias_grad")
                    out = _xformers(qg, kg, vg, bg, kpm, 0.1 if case.dropout else 0.0, scale)
                    if out.requires_grad:
                        out.float().sum().backward()
    return None


def _measure(name: str, fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Median seconds of ``fn`` (backend ``name``) after one warm-up, synchronising the device around each run."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _autotune(case: AttentionCase, inputs: tuple) -> tuple[str, str]:
    q, k, v, bias, kpm, p, scale = inputs
    key = (case, tuple(q.shape), tuple(k.shape), tuple(v.shape), None if bias is None else tuple(bias.shape))
    if key in _TUNED:
        return _TUNED[key]

    def runner(name: str) -> Callable[[], object]:
        impl = _IMPLS[name]
        qc, kc, vc = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        bc = None if bias is None else bias.detach().requires_grad_(case.bias == "bias_grad")

        def run() -> object:
            if not case.grad:
                with torch.no_grad():
                    return impl(qc, kc, vc, bc, kpm, p, scale)
            out = impl(qc, kc, vc, bc, kpm, p, scale)
            out.float().sum().backward()
            return None

        return run

    dev = q.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type="cuda"):
        t_x = _measure("xformers", runner("xformers"), dev)
        t_s = _measure("sdpa", runner("sdpa"), dev)
    name = "xformers" if t_x < t_s else "sdpa"
    shape = "x".join(str(s) for s in q.shape)
    reason = f"auto: fastest for {case.describe()} q={shape}: xformers {t_x * 1e3:.3f} ms, sdpa {t_s * 1e3:.3f} ms"
    _TUNED[key] = (name, reason)
    return name, reason


def _default_case(dev: torch.device, has_bias: bool) -> AttentionCase:
    # what a training step of the FIBER towers asks for: Swin windows (head dim 32, bias with gradient) or text
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if has_bias:
        return AttentionCase(dev.type, dtype, 32, "bias_grad", False, False, True)
    return AttentionCase(dev.type, dtype, 64, "none", True, True, True)


def _requested(requested: str | None) -> tuple[str | None, str]:
    # (name or None for auto, where the name came from): override > argument > environment
    name = current_backend_override()
    if name is not None and name != "auto":
        return name, "use_attention_backend()"
    if requested not in (None, "auto"):
        return requested, "config/argument"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return _check_name(env, f"${ENV_VAR}"), f"${ENV_VAR}"
    return None, ""


def resolve_backend(
    requested: str | None = None,
    *,
    device: torch.device | str | None = None,
    has_bias: bool = False,
    case: AttentionCase | None = None,
    inputs: tuple | None = None,
) -> tuple[str, str]:
    """Decide which backend runs and why.

    Args:
        requested: backend named by the caller (e.g. a config field); ``None`` or ``"auto"`` defers to the
            environment variable and the automatic rule.
        device: device of the tensors (default: CUDA if available, else CPU).
        has_bias: whether a float bias tensor is passed (used only when ``case`` is not given).
        case: the call's :class:`AttentionCase` (default: a training call of the FIBER towers on ``device``).
        inputs: the call's ``(q, k, v, bias, key_padding_mask, dropout_p, scale)``; under ``"auto"``, when
            xformers runs the case, both backends are timed on them once per shape and the faster is kept.

    Returns:
        ``(name, reason)`` with ``name`` in ``{"xformers", "sdpa", "eager"}``.
    """
    if _is_exporting():
        return "eager", "tracing/export in progress: eager is the exportable backend"
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, source = _requested(requested)
    if name is None:
        if not xformers_available():
            return "sdpa", "auto: xformers not importable, using torch SDPA"
        if dev.type not in AUTO_XFORMERS_DEVICES:
            return "sdpa", f"auto: device is {dev.type}, xformers kernels are CUDA kernels; using torch SDPA"
        case = case or _default_case(dev, has_bias)
        why = probe_xformers(case)
        if why is not None:
            return "sdpa", f"auto: xformers cannot run {case.describe()} ({why}); using torch SDPA"
        if inputs is None:
            return "xformers", f"auto: xformers runs {case.describe()}"
        return _autotune(case, inputs)
    _check_name(name, source)
    if name == "xformers":
        case = case or _default_case(dev, has_bias)
        why = probe_xformers(case)
        if why is not None:
            return "sdpa", f"{source} asked for xformers but it cannot run {case.describe()} ({why}){_FALLBACK_SUFFIX}"
    return name, f"requested by {source}"


def attention_report() -> list[dict[str, str]]:
    """Every backend decision taken in this process: ``[{"case", "backend", "reason"}, ...]`` in order."""
    return [{"case": c, "backend": n, "reason": r} for c, (n, r) in _REPORT.items()]


def _note(case: AttentionCase, name: str, reason: str) -> None:
    # remember the decision of a case; log each distinct reason once (fallbacks from an explicit request warn)
    desc = case.describe()
    if _REPORT.get(desc) != (name, reason):
        _REPORT[desc] = (name, reason)
    if reason in _warned:
        return
    _warned.add(reason)
    if reason.endswith(_FALLBACK_SUFFIX):
        warnings.warn(reason, stacklevel=3)
        logger.warning("attention backend: %s", reason)
    elif "xformers" in reason and name != "xformers":
        logger.warning("attention backend: %s", reason)
    else:
        logger.info("attention backend %s: %s", name, reason)


def _compiled_backend(requested: str | None) -> str:
    # inside torch.compile: no probing, timing or logging; the compiler's SDPA replaces xformers and auto
    if _is_exporting():
        return "eager"
    name, _ = _requested(requested)
    return "eager" if name == "eager" else "sdpa"


def _fix_padding(key_padding_mask: Tensor | None) -> Tensor | None:
    # Rows whose keys are all padding behave as unmasked (the reference's −10000 is then a constant shift).
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got {key_padding_mask.dtype}")
    return key_padding_mask | ~key_padding_mask.any(dim=-1, keepdim=True)


def _eager(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    # Scale the [.., M, D] queries rather than the [.., M, N] logits and add the bias in the compute dtype: the
    # fewest full passes over the [B, H, M, N] logits. The CPU and CUDA softmax kernels accumulate bf16/fp16
    # inputs in float32 and round only their output, so no explicit upcast (and no extra cast pass) is needed.
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if kpm is not None:
        scores = scores.masked_fill(~kpm[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def _sdpa_needs_math(q: Tensor, bias: Tensor | None, dropout_p: float) -> bool:
    # On CPU, SDPA's fused (flash) kernel has no gradient for a float mask and no dropout; in those cases it
    # silently runs its math fallback, which is the same computation as `_eager` plus extra passes over the
    # logits (`_safe_softmax`'s all-masked-row check), so `_eager` is used directly (about 1.7x faster for
    # Swin's window attention in training). Padding is never all-masked here (see `_fix_padding`).
    if q.device.type != "cpu":
        return False
    bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    return bias_grad or dropout_p > 0.0


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    if _sdpa_needs_math(q, bias, dropout_p):
        return _eager(q, k, v, bias, kpm, dropout_p, scale)
    mask: Tensor | None
    if kpm is None:
        mask = None if bias is None else bias.to(q.dtype)
    elif bias is None:
        mask = kpm[:, None, None, :]
    else:
        mask = bias.to(q.dtype).masked_fill(~kpm[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _aligned_bias(bias: Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor:
    # xformers wants the bias' last-dim storage aligned to 8 elements: allocate padded, then slice.
    b, h, m, n = shape
    n_pad = (n + 7) // 8 * 8
    out = bias.new_zeros((b, h, m, n_pad), dtype=dtype)
    out[..., :n] = bias.to(dtype).expand(b, h, m, n)
    return out[..., :n]


def _xformers(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, kpm: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    # xformers is optional, not installed in the pinned dev venv (constraints.txt)
    import xformers.ops as xops  # pyright: ignore[reportMissingImports]
    from xformers.ops import fmha  # pyright: ignore[reportMissingImports]

    b, h, m, d = q.shape
    n = k.shape[2]
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # [B, M, H, D] layout of xformers
    if kpm is not None and bias is None:
        lengths = kpm.sum(dim=1)
        is_prefix = bool((kpm == (torch.arange(n, device=kpm.device)[None, :] < lengths[:, None])).all())
        if is_prefix:
            # Pack the real keys of every sample into one sequence; the block-diagonal mask keeps samples apart.
            lens = lengths.tolist()
            attn_bias = fmha.BlockDiagonalMask.from_seqlens(q_seqlen=[m] * b, kv_seqlen=lens)
            kp = kx[kpm].unsqueeze(0)
            vp = vx[kpm].unsqueeze(0)
            out = xops.memory_efficient_attention(
                qx.reshape(1, b * m, h, d), kp, vp, attn_bias=attn_bias, p=dropout_p, scale=scale
            )
            return out.reshape(b, m, h, d).transpose(1, 2)
    dense: Tensor | None = None
    if bias is not None or kpm is not None:
        base = bias if bias is not None else q.new_zeros(())
        dense = _aligned_bias(base, (b, h, m, n), q.dtype)
        if kpm is not None:
            dense.masked_fill_(~kpm[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=dense, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


_IMPLS: dict[str, Callable[..., Tensor]] = {"eager": _eager, "sdpa": _sdpa, "xformers": _xformers}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention through the selected backend.

    Args:
        q: queries ``[B, H, M, D]``.
        k: keys ``[B, H, N, D]``.
        v: values ``[B, H, N, Dv]``.
        bias: optional additive float bias broadcastable to ``[B, H, M, N]`` (e.g. Swin relative-position bias
            plus the −100 shift mask).
        key_padding_mask: optional ``BoolTensor [B, N]``, ``True`` for real keys; a fully padded row attends
            to all keys (reference −10000 semantics, never NaN).
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        scale: logit scale, default ``D ** -0.5``.
        backend: requested backend (usually the model's config field); see :func:`resolve_backend`.

    Returns:
        ``[B, H, M, Dv]``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects [B, H, M, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask shape {tuple(key_padding_mask.shape)} != [B, N] = {(k.shape[0], k.shape[2])}"
        )
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kpm = _fix_padding(key_padding_mask)
    p = float(dropout_p)
    if torch.compiler.is_compiling():
        return _IMPLS[_compiled_backend(backend)](q, k, v, bias, kpm, p, sc)
    case = AttentionCase.of(q, k, v, bias, kpm is not None, p)
    name, reason = resolve_backend(backend, device=q.device, case=case, inputs=(q, k, v, bias, kpm, p, sc))
    _note(case, name, reason)
    return _IMPLS[name](q, k, v, bias, kpm, p, sc)
