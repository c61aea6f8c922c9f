"""Saving and loading backbone weights (safetensors + JSON config) and the resolution change of docs/reference/architecture.md §2.2.

A saved model is a directory with ``config.json`` (the resolved :class:`BackboneConfig` plus a format version)
and ``model.safetensors``. Both are written atomically (temporary file + :func:`os.replace`). Loading never
unpickles anything and rejects weights from another model with an error listing the missing, unexpected and
mis-shaped keys. Relative-position-bias tables whose window differs from the model's are resized bicubically
(``align_corners=False``, per head, on the ``(2w-1) × (2w-1)`` grid), as the official fine-tuning loader does
when moving 384-px weights to 576 px.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from fiber_backbones.config import BackboneConfig
from fiber_backbones.model import FiberBackbone

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "WeightsFormatError",
    "weights_file",
    "WeightsMismatchError",
    "abbreviate_keys",
    "from_pretrained",
    "key_mismatch_lines",
    "load_weights",
    "resize_relative_position_bias_table",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class WeightsFormatError(ValueError):
    """A weights path that is not a safetensors file (a pickle is refused, never unpickled)."""


class WeightsMismatchError(RuntimeError):
    """Raised when a checkpoint does not fit the model (lists missing, unexpected and mis-shaped keys)."""


def abbreviate_keys(keys: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` of ``keys`` joined by ``", "``, followed by ``", ... (+N)"`` for the ``N`` left out."""
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")


def key_mismatch_lines(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]) -> list[str]:
    """The lines of a checkpoint-does-not-fit error: ``"  <title> (<count>): <keys>"`` for each non-empty list
    (missing keys, unexpected keys, shape mismatches, in that order; at most 20 keys each, see
    :func:`abbreviate_keys`)."""
    groups = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
    return [f"  {title} ({len(items)}): {abbreviate_keys(items)}" for title, items in groups if items]


def resize_relative_position_bias_table(table: Tensor, window: int) -> Tensor:
    """Bicubically resize a relative-position-bias table to a new window (docs/reference/architecture.md §2.2).

    Args:
        table: ``[(2w-1)², heads]``.
        window: new window side ``w'``.

    Returns:
        ``[(2w'-1)², heads]`` (the input itself when the size is unchanged).

    Raises:
        ValueError: if ``table`` is not a square-grid table.
    """
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table with {rows} rows is not a (2w-1)^2 grid")
    new_side = 2 * window - 1
    if new_side == side:
        return table
    grid = table.float().T.reshape(1, heads, side, side)
    out = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return out.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: a crash leaves the
    previous file or the complete new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(
    model: FiberBackbone, directory: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Args:
        model: the backbone.
        directory: target directory.
        metadata: optional string metadata stored in the safetensors header.

    Returns:
        The directory path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "fiber_backbones_format": str(FORMAT_VERSION), **dict(metadata or {})}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=meta))
    cfg = {"format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"

    def write_json(p: str) -> None:
        with open(p, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(out / CONFIG_NAME, write_json)
    return out


def weights_file(path: str | os.PathLike[str]) -> Path:
    """The safetensors file of ``path`` (a ``.safetensors`` file, or a directory holding ``model.safetensors``).

    Raises:
        FileNotFoundError: no such file.
        WeightsFormatError: anything but ``.safetensors`` (pickles are never loaded); says how to convert.
    """
    return _weights_file(path)


def _weights_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no weights file at {p}")
    if p.suffix != ".safetensors":
        raise WeightsFormatError(
            f"{p}: only .safetensors weights are loaded, never pickles (.pt/.pth/.ckpt can run code); convert an "
            "official checkpoint with `fiber-train convert SRC OUT_DIR` and give OUT_DIR, or give the model/ folder "
            "of a fiber-train run"
        )
    return p


def load_weights(
    model: FiberBackbone, path: str | os.PathLike[str], *, strict: bool = True, resize_rel_pos: bool = True
) -> dict[str, list[str]]:
    """Load a safetensors state dict into ``model``.

    Args:
        model: target backbone.
        path: a ``.safetensors`` file or a directory holding ``model.safetensors``.
        strict: raise on any missing, unexpected or mis-shaped key.
        resize_rel_pos: resize relative-position tables whose window differs from the model's.

    Returns:
        ``{"missing": [...], "unexpected": [...], "resized": [...]}`` (the first two empty when ``strict``).

    Raises:
        WeightsMismatchError: naming the file and listing offending keys.
    """
    file = _weights_file(path)
    state = load_file(str(file))
    own = model.state_dict()
    resized: list[str] = []
    mismatched: list[str] = []
    for key, value in list(state.items()):
        if key not in own:
            continue
        target = own[key].shape
        if value.shape == target:
            continue
        if resize_rel_pos and key.endswith("relative_position_bias_table") and value.shape[1] == target[1]:
            window = (math.isqrt(target[0]) + 1) // 2
            state[key] = resize_relative_position_bias_table(value, window)
            resized.append(key)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target)}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        parts = [f"{file} does not match this {type(model).__name__} (variant {model.config.variant!r}):"]
        parts += key_mismatch_lines(missing, unexpected, mismatched)
        raise WeightsMismatchError("\n".join(parts))
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "unexpected": unexpected, "resized": resized}


def read_config(directory: str | os.PathLike[str]) -> BackboneConfig:
    """Read and validate ``config.json`` of a saved backbone.

    Raises:
        ValueError: for a missing/unsupported format version; KeyError for unknown config keys.
    """
    file = Path(directory) / CONFIG_NAME
    with open(file, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    version = data.get("format_version")
    if version != FORMAT_VERSION or "config" not in data:
        raise ValueError(f"{file}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
    return BackboneConfig.from_dict(data["config"])


def from_pretrained(
    directory: str | os.PathLike[str], *, device: torch.device | str = "cpu", **overrides: Any
) -> FiberBackbone:
    """Rebuild a saved backbone and load its weights.

    Args:
        directory: written by :func:`save_pretrained`.
        device: where to put the model.
        **overrides: config overrides (dotted or nested), e.g. ``**{"swin.img_size": 576}`` to change the
            resolution of a coarse model (tables are resized).

    Returns:
        The model in eval mode.
    """
    cfg = read_config(directory)
    if overrides:
        cfg = cfg.replace(overrides)
    model = FiberBackbone(cfg)
    load_weights(model, directory)
    return model.to(device).eval()
