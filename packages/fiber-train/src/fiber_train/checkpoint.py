"""Crash-safe checkpoints: weights in safetensors, training state loadable with ``weights_only=True``.

Layout of one checkpoint (a directory)::

    checkpoints/step_00001000/
        model.safetensors   # model weights (strictly loaded)
        state.pt            # optimiser, scheduler, RNG states, data position: tensors and plain Python only
        meta.json           # step, resolved config, format version; written last

The directory is first written under a temporary name and renamed into place only when every file is on
disk and flushed, so a crash (SIGKILL, full disk) at any moment leaves either the previous checkpoints or a
complete new one; stale temporary directories are removed on the next save or resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_FORMAT = 1
_STEP_PREFIX = "step_"
_TMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or belongs to another model."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + _TMP_MARK)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_for_saving(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a state dict, with tensors that share storage de-aliased (safetensors refuses
    aliased tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def save_weights(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write weights as safetensors, atomically."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + _TMP_MARK)
    os.close(fd)
    try:
        save_file(weights_for_saving(state), tmp, metadata=metadata)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(model: nn.Module, path: Path, *, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load safetensors weights into ``model``.

    Returns:
        ``(missing, unexpected)`` key lists (both empty when ``strict``).

    Raises:
        CheckpointError: unreadable/corrupt file, or (strict) keys or shapes that do not match the model,
            listing up to 10 offending keys of each kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if shape_bad or (strict and (missing or unexpected)):

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shape_bad:
            parts.append(
                "shape mismatch: "
                + few([f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape_bad])
            )
        raise CheckpointError(f"{path}: checkpoint does not match this model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=strict)
    return missing, unexpected


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy and torch (CPU and CUDA) as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep: int = 0,
) -> Path:
    """Write a complete checkpoint for ``step`` under ``ckpt_root`` atomically and prune old ones.

    Args:
        ckpt_root: the run's ``checkpoints/`` directory.
        step: optimiser step count.
        model: model whose weights go to ``model.safetensors``.
        state: training state (optimizer/scheduler state dicts, RNG, data position, counters): tensors and
            plain Python containers only, so that it loads with ``weights_only=True``.
        config: resolved configuration (stored in ``meta.json``).
        keep: keep only the newest ``keep`` checkpoints (0 keeps all).

    Returns:
        The checkpoint directory.
    """
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(ckpt_root)
    final = ckpt_root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=final.name + _TMP_MARK))
    try:
        save_weights(model, tmp / "model.safetensors")
        torch.save(dict(state), tmp / "state.pt")
        _fsync_file(tmp / "state.pt")
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "time": time.time(), "config": dict(config)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale_tmp(ckpt_root: Path) -> None:
    for p in ckpt_root.glob(f"*{_TMP_MARK}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (``meta.json`` present), oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(_STEP_PREFIX) and _TMP_MARK not in p.name and (p / "meta.json").is_file():
            try:
                found.append((int(p.name[len(_STEP_PREFIX) :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` and return ``(state, meta)``.

    ``state.pt`` is read with ``torch.load(weights_only=True)``: a file that needs pickled code is refused.

    Raises:
        CheckpointError: incomplete or corrupt checkpoint, or weights of another model.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (meta.json missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc})") from exc
    load_weights(model, path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'state.pt'}: cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    return state, meta
