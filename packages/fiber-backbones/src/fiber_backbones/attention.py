"""One attention entry point with interchangeable backends (design notes §8; masks of spec §2.1, §3, §5, §6).

:func:`attention` computes ``softmax(q·kᵀ·scale + bias + padding) · v`` on ``[B, H, M, D]`` tensors with one of
three backends:

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA only, import-guarded). Key padding is
  expressed as a ``BlockDiagonalMask`` built from the per-sample key lengths, with the keys packed, so no dense
  ``[B, H, M, N]`` mask is built.
- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`; key padding is a broadcast boolean
  ``[B, 1, 1, N]`` mask. On CPU, where SDPA itself would fall back to its unfused math kernel (a float bias that
  needs a gradient, e.g. Swin's relative-position bias in training, or attention dropout), the eager kernel
  below runs instead: same maths, fewer passes over the logits.
- ``"eager"``: explicit matmul + softmax (float32 accumulation inside the softmax kernel), traceable/exportable.
  It materialises the ``[B, H, M, N]`` logits, as any backend must when the bias needs a gradient.

Selection, from highest to lowest priority: the :func:`use_attention_backend` context manager, an explicit
``backend=`` argument (the model passes its config field), the ``FIBER_ATTN_BACKEND`` environment variable, then
``"auto"``. ``"auto"`` picks xformers when it is importable, the tensors are on CUDA and there is no tensor bias
(Swin's window bias needs a gradient, which the xformers kernels do not all provide), else SDPA. Tracing, ``torch.export``
and ONNX export always use eager. :func:`resolve_backend` returns the chosen name and the reason.

Padding convention: ``key_padding_mask`` is a ``BoolTensor [B, N]`` with ``True`` for a real key. The reference
model adds −10000 to padded keys, which for a row whose keys are *all* padding is a constant shift that leaves the
softmax unchanged. We reproduce that exactly: a fully padded row attends to all of its keys as if unmasked, so no
backend ever produces NaN.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "attention",
    "current_backend_override",
    "resolve_backend",
    "use_attention_backend",
    "xformers_available",
]

BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "eager")
ENV_VAR = "FIBER_ATTN_BACKEND"

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
    """Whether ``xformers.ops`` imports (says nothing about CUDA); probed once, then a cached module global."""
    global _XFORMERS_OK
    if _XFORMERS_OK is None:
        try:
            import xformers.ops  # noqa: F401

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


def resolve_backend(
    requested: str | None = None,
    *,
    device: torch.device | str | None = None,
    has_bias: bool = False,
) -> tuple[str, str]:
    """Decide which backend runs and why.

    Args:
        requested: backend named by the caller (e.g. a config field); ``None`` or ``"auto"`` defers to the
            environment variable and the automatic rule.
        device: device of the tensors (default: CUDA if available, else CPU).
        has_bias: whether a float bias tensor is passed (disqualifies xformers under ``"auto"``).

    Returns:
        ``(name, reason)`` with ``name`` in ``{"xformers", "sdpa", "eager"}``.
    """
    if _is_exporting():
        return "eager", "tracing/export in progress: eager is the exportable backend"
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = "use_attention_backend()"
    name = current_backend_override()
    if name is None or name == "auto":
        name, source = (requested, "config/argument") if requested not in (None, "auto") else (None, "")
    if name is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            name, source = _check_name(env, f"${ENV_VAR}"), f"${ENV_VAR}"
    if name is None or name == "auto":
        if not xformers_available():
            return "sdpa", "auto: xformers not importable, using torch SDPA"
        if dev.type != "cuda":
            return "sdpa", f"auto: device is {dev.type}, xformers needs CUDA; using torch SDPA"
        if has_bias:
            return "sdpa", "auto: tensor bias (Swin window bias) is routed to torch SDPA"
        return "xformers", "auto: xformers importable and device is CUDA"
    _check_name(name, source)
    if name == "xformers" and (not xformers_available() or dev.type != "cuda"):
        why = "not importable" if not xformers_available() else f"device is {dev.type}"
        return "sdpa", f"{source} asked for xformers but it is unusable ({why}){_FALLBACK_SUFFIX}"
    return name, f"requested by {source}"


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
    import xformers.ops as xops
    from xformers.ops import fmha

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
    name, reason = resolve_backend(backend, device=q.device, has_bias=bias is not None)
    if reason.endswith(_FALLBACK_SUFFIX) and reason not in _warned:
        _warned.add(reason)  # warn once per distinct fallback
        warnings.warn(reason, stacklevel=2)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _IMPLS[name](q, k, v, bias, _fix_padding(key_padding_mask), float(dropout_p), sc)
