"""Crash-safe checkpoints: weights in safetensors, training state loadable with ``weights_only=True``.

Layout of one checkpoint (a directory)::

    checkpoints/step_00001000/
        model.safetensors   # model weights (strictly loaded)
        state.pt            # optimiser, scheduler, RNG states, data position: tensors and plain Python only
        meta.json           # step, resolved config, format version; written last

A sharded checkpoint (``trainer.strategy=fsdp``, ``trainer.fsdp_checkpoint=sharded``) holds ``sharded/`` (every
rank's shard of the weights and optimiser state, written through Fabric's distributed checkpoint) instead of
``model.safetensors``; ``state.pt`` then holds the rest of the training state (see :mod:`fiber_train.distributed`).

The directory is first written under a temporary name and renamed into place only when every file is on
disk and flushed, so a crash (SIGKILL, full disk) at any moment leaves either the previous checkpoints or a
complete new one; stale temporary directories are removed on the next save or resume. Directories that are
replaced (the same step saved again) or pruned are first renamed to a temporary name and only then deleted,
so a crash in the middle of a deletion never leaves a half-deleted directory that looks complete.

Test hook (crash tests only): with ``FIBER_TEST_CRASH_IN_SAVE=<phase>[@<step>]`` in the environment,
:func:`save_checkpoint` kills its own process with ``SIGKILL`` at ``<phase>`` (of the save of ``<step>``, or
of every save): ``weights`` (after ``model.safetensors``), ``state`` (after ``state.pt``), ``meta`` (after
``meta.json``, before the rename), ``replace`` (a re-saved step moved aside, new one not yet in place),
``rename`` (after the rename) or ``prune`` (after an old checkpoint was moved aside for deletion). It is read
on every save and does nothing when unset. ``tests/reliability`` uses it to kill a run mid-write.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_FORMAT = 1
_STEP_PREFIX = "step_"
_TMP_MARK = ".tmp-"
#: files every complete checkpoint directory holds
CHECKPOINT_FILES = ("model.safetensors", "state.pt", "meta.json")
#: folder of a sharded checkpoint that replaces ``model.safetensors`` (Fabric / torch distributed checkpoint)
SHARDED_DIR = "sharded"
#: environment variable of the crash-test hook (see the module docstring)
CRASH_ENV = "FIBER_TEST_CRASH_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or belongs to another model."""


def _crash_point(phase: str, step: int) -> None:
    """Test hook: ``SIGKILL`` this process when ``FIBER_TEST_CRASH_IN_SAVE`` names ``phase`` (and ``step``)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, _, at = spec.partition("@")
    if want == phase and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


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


def write_dir_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """Create the directory ``path`` through ``write(tmp)`` on a sibling temporary directory, then move it into
    place. An existing ``path`` (e.g. the previous ``RUN/best``) is replaced only once the new one is complete,
    so a crash mid-write leaves the old directory (or, between the two renames, ``<path>.old``) intact.

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def weights_for_saving(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a state dict, with tensors that share storage de-aliased (safetensors refuses
    aliased tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int | torch.SymInt]] = set()
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
    # the legacy (default) form: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
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
    model: nn.Module | Mapping[str, torch.Tensor] | None,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep: int = 0,
    *,
    write_shards: Callable[[Path], Any] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` under ``ckpt_root`` atomically and prune old ones.

    Args:
        ckpt_root: the run's ``checkpoints/`` directory.
        step: optimiser step count.
        model: model (or full state dict) whose weights go to ``model.safetensors``; ``None`` with
            ``write_shards``.
        state: training state (optimizer/scheduler state dicts, RNG, data position, counters): tensors and
            plain Python containers only, so that it loads with ``weights_only=True``.
        config: resolved configuration (stored in ``meta.json``).
        keep: keep only the newest ``keep`` checkpoints (0 keeps all).
        write_shards: writes the weights and optimiser shards into ``<tmp>/sharded`` given the temporary
            checkpoint directory (a sharded checkpoint; every rank writes its part inside this call).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: the checkpoint could not be written (``OSError`` such as a full disk, chained); the
            partial files are removed and the previous checkpoints are left as they were.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / checkpoint_name(step)
    tmp: Path | None = None
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(ckpt_root)
        tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=final.name + _TMP_MARK))
        if write_shards is not None:
            write_shards(tmp)
            for f in (tmp / SHARDED_DIR).rglob("*"):
                if f.is_file():
                    _fsync_file(f)
            _fsync_dir(tmp / SHARDED_DIR)
        if model is not None:
            save_weights(model, tmp / "model.safetensors")
        _crash_point("weights", step)
        torch.save(dict(state), tmp / "state.pt")
        _fsync_file(tmp / "state.pt")
        _crash_point("state", step)
        meta = {"format": CHECKPOINT_FORMAT, "step": step, "time": time.time(), "config": dict(config)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, default=str))
        _fsync_dir(tmp)
        _crash_point("meta", step)
        if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
            # A directory cannot be renamed over a non-empty one: move the old one aside first (atomic), so a
            # crash here leaves no step-`step` checkpoint (resume uses the previous one), never a broken one.
            _discard(final)
            _crash_point("replace", step)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        _crash_point("rename", step)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(exc, ckpt_root)  # before the partial files are removed
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if full or isinstance(exc, OSError):
            # torch.save and safetensors report a full disk as RuntimeError / SafetensorError, not OSError
            previous = latest_checkpoint(ckpt_root)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            cause = "disk full" if full else f"{type(exc).__name__}: {first}"
            raise CheckpointError(
                f"could not write checkpoint {final} ({cause}): "
                + (f"the latest complete checkpoint is still {previous}" if previous else "no complete checkpoint")
                + ("; free space on that disk, or lower trainer.keep_checkpoints" if full else "")
            ) from exc
        raise
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            _discard(old)
            _crash_point("prune", step)
    _remove_stale_tmp(ckpt_root)
    return final


_DISK_FULL_TEXT = ("no space left", "storagefull", "disk quota", "file write failed", "unexpected pos")


def _disk_full(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (raised while writing under ``where``) means the disk is full.

    ``OSError`` carries ``ENOSPC``/``EDQUOT``; torch.save raises ``RuntimeError("... file write failed")`` and
    safetensors its own error naming ``StorageFull``; a filesystem with no free byte left says it too.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(seen).lower() for t in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free == 0
    except OSError:
        return False


def _discard(path: Path) -> None:
    """Delete a checkpoint directory crash-safely: rename it to a temporary name (atomic), then delete that."""
    doomed = path.with_name(path.name + _TMP_MARK + "old")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def estimate_checkpoint_bytes(model: nn.Module, optimizer_slots: int = 2) -> int:
    """Rough size of one checkpoint of ``model``: its weights plus ``optimizer_slots`` copies (AdamW: 2)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + optimizer_slots * trainable


def check_output_dir(run_dir: Path, bytes_needed: int = 0) -> None:
    """Fail early, before any training, when ``run_dir`` cannot hold the run's outputs.

    Creates ``run_dir`` (with parents), writes and deletes a probe file, and compares the free space of its
    file system with ``bytes_needed`` (e.g. ``(keep_checkpoints + 1) * estimate_checkpoint_bytes(model)``:
    a new checkpoint is complete before the oldest is pruned).

    Raises:
        CheckpointError: the directory cannot be created or written, or its disk has less free space than
            ``bytes_needed``; the message names the directory and the numbers.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe{_TMP_MARK}{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"run directory {run_dir} is not writable: {exc}") from exc
    if bytes_needed > 0:
        free = shutil.disk_usage(run_dir).free
        if free < bytes_needed:
            raise CheckpointError(
                f"run directory {run_dir}: {free / 2**20:.1f} MiB free on its disk, but the checkpoints need about "
                f"{bytes_needed / 2**20:.1f} MiB; free space, lower trainer.keep_checkpoints or choose another "
                "trainer.out_dir"
            )


def _remove_stale_tmp(ckpt_root: Path) -> None:
    for p in ckpt_root.glob(f"*{_TMP_MARK}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (all of :data:`CHECKPOINT_FILES` present), oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        if p.name.startswith(_STEP_PREFIX) and _TMP_MARK not in p.name and is_complete_checkpoint(p):
            try:
                found.append((int(p.name[len(_STEP_PREFIX) :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether the checkpoint directory ``path`` holds sharded weights (``sharded/``, no ``model.safetensors``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file() and not (Path(path) / "model.safetensors").is_file()


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds every file of a checkpoint (:data:`CHECKPOINT_FILES`, or ``sharded/`` in place of
    ``model.safetensors``)."""
    path = Path(path)
    if not path.is_dir() or not all((path / f).is_file() for f in CHECKPOINT_FILES[1:]):
        return False
    return (path / CHECKPOINT_FILES[0]).is_file() or is_sharded_checkpoint(path)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path, model: nn.Module | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` and return ``(state, meta)``.

    With ``model=None`` only the training state is read (the weights of a sharded checkpoint are loaded into the
    sharded model by :func:`fiber_train.distributed.load_sharded`).

    ``state.pt`` is read with ``torch.load(weights_only=True)``: a file that needs pickled code is refused.

    Raises:
        CheckpointError: incomplete or corrupt checkpoint, or weights of another model.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (meta.json missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{meta_path}: corrupt ({type(exc).__name__}: {exc}); delete the directory {path} to resume from the "
            "checkpoint before it"
        ) from exc
    if model is not None:
        if is_sharded_checkpoint(path):
            raise CheckpointError(
                f"{path}: a sharded checkpoint (trainer.strategy=fsdp, trainer.fsdp_checkpoint=sharded): resume it "
                "with trainer.strategy=fsdp"
            )
        load_weights(model, path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'state.pt'}: cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    return state, meta
