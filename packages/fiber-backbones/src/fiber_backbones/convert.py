"""Official FIBER checkpoints <-> our backbone layout (``docs/reference/architecture.md`` §2.2, §7, §11, §13).

Reading (:func:`read_official_checkpoint`) never unpickles code: files are opened with
``torch.load(weights_only=True)`` (or safetensors), and a file that needs anything beyond tensors and plain
containers is refused. Containers understood (§13.1, §13.2):

- a Lightning checkpoint (coarse): the weights are under ``state_dict``;
- a detector checkpoint (fine): the weights are under ``model`` (optionally ``model_ema``) with ``module.`` prefixes;
- anything else that is a mapping of tensors is a bare state dict.

Conversion (:func:`convert_official_backbone`) maps every official *backbone* key through explicit key-family
tables (regular expressions on the key below the tower prefix, no suffix matching):

==================================================  =========================  ======================
official prefix                                     source                     ours
==================================================  =========================  ======================
``vit_model.``                                      coarse                     ``image_encoder.``
``text_transformer.``                               coarse                     ``text_encoder.``
``fusion_backbone.backbone.body.``                  fine                       ``image_encoder.``
``fusion_backbone.language_backbone.body.model.``   fine                       ``text_encoder.``
==================================================  =========================  ======================

Below the prefix our module names equal the official ones. A key the target model has no slot for is dropped
only when its family is documented as optional (buffers, unused parameters of §11, variant differences of §9
and §13.3), always with the reason; a target parameter the source lacks is initialised only when the reference says
how (stage norms, final norm, gates, cross-attention / query LayerNorms: LayerNorm ``(1, 0)``, gates ``0``).
Everything else raises. Relative-position tables are resized bicubically when the window changes (§2.2).
Non-backbone keys (heads, FPN, ``rpn.*``) are returned untouched in :attr:`ConversionReport.rest`.

:func:`to_official_backbone` is the inverse (ours -> official key names), optionally completed with the
deterministic buffers and the unused RoBERTa pooler so that the result has exactly the official key set.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from fiber_backbones.config import BackboneConfig
from fiber_backbones.model import FiberBackbone
from fiber_backbones.registry import get_config
from fiber_backbones.swin import DropPath, WindowAttention, relative_position_index, shift_window_mask
from fiber_backbones.weights import resize_relative_position_bias_table

__all__ = [
    "OFFICIAL_PREFIXES",
    "QUEUE_BUFFERS",
    "CheckpointFormatError",
    "ConversionReport",
    "build_converted_backbone",
    "convert_official_backbone",
    "default_target_variant",
    "detect_source",
    "official_target_config",
    "read_official_checkpoint",
    "to_official_backbone",
    "unwrap_state_dict",
]

Source = Literal["coarse", "fine"]

OUR_IMAGE_PREFIX = "image_encoder."
OUR_TEXT_PREFIX = "text_encoder."

OFFICIAL_PREFIXES: dict[Source, tuple[str, str]] = {
    "coarse": ("vit_model.", "text_transformer."),
    "fine": ("fusion_backbone.backbone.body.", "fusion_backbone.language_backbone.body.model."),
}
"""``source -> (image tower prefix, text tower prefix)`` of the official checkpoints (docs/reference/architecture.md §13.3)."""

QUEUE_BUFFERS: frozenset[str] = frozenset(
    {
        "image_queue",
        "text_queue",
        "image_input_queue",
        "text_input_queue",
        "text_input_mask_queue",
        "queue_ptr",
        "queue_total",
    }
)
"""Top-level ITC queue buffers of coarse pre-training / ITC checkpoints (docs/reference/architecture.md §11): training state, dropped."""


class CheckpointFormatError(ValueError):
    """A file or state dict is not a (safely loadable) official FIBER checkpoint; the message says why."""


# --------------------------------------------------------------------------------------------- key families
_RegexTable = tuple[tuple[re.Pattern[str], str], ...]


def _regex_table(*rows: tuple[str, str]) -> _RegexTable:
    """``(regex, value)`` rows with each regex compiled, for :func:`_family`."""
    return tuple((re.compile(rx), value) for rx, value in rows)


def _family(sub: str, table: _RegexTable) -> str | None:
    """The value of the first row of ``table`` whose regex matches the whole of ``sub`` (``None``: no row does)."""
    for rx, value in table:
        if rx.fullmatch(sub):
            return value
    return None


# Each family: (regex on the key below the tower prefix, family name). Families decide what happens when the
# target model has, or lacks, the key (see _DROP_REASONS / _ALWAYS_DROPPED / _INIT_RULES).
_SWIN_FAMILIES = _regex_table(
    (r"patch_embed\.(proj|norm)\.(weight|bias)", "swin"),
    (r"layers\.\d+\.blocks\.\d+\.(norm1|norm2)\.(weight|bias)", "swin"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)", "swin"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table", "rel_pos_table"),
    (r"layers\.\d+\.blocks\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)", "swin"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.(alpha_i2t|(qkv_text_i2t|qkv_i2t|proj_i2t)\.(weight|bias))", "i2t"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.norm_i2t_i\.(weight|bias)", "i2t_query_norm"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", "rel_pos_index"),
    (r"layers\.\d+\.blocks\.\d+\.attn_mask", "attn_mask"),
    (r"layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))", "swin"),
    (r"norm\.(weight|bias)", "final_norm"),
    (r"norm\d+\.(weight|bias)", "stage_norm"),
)
_TEXT_FAMILIES = _regex_table(
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", "text"),
    (r"embeddings\.LayerNorm\.(weight|bias)", "text"),
    (r"embeddings\.position_ids", "position_ids"),
    (r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.(weight|bias)", "text"),
    (r"encoder\.layer\.\d+\.attention\.output\.(dense|LayerNorm)\.(weight|bias)", "text"),
    (r"encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)", "text"),
    (r"encoder\.layer\.\d+\.alpha_t2i", "t2i_gate"),
    (r"encoder\.layer\.\d+\.crossattention_t2i\.(self\.(query|key|value)|output\.dense)\.(weight|bias)", "t2i"),
    (r"encoder\.layer\.\d+\.crossattention_t2i\.output\.LayerNorm\.(weight|bias)", "t2i_output_norm"),
    (r"pooler\.dense\.(weight|bias)", "text_pooler"),
)

# Families never loaded into our model (deterministic buffers, unused parameters), with the reason.
_ALWAYS_DROPPED: dict[str, str] = {
    "rel_pos_index": "deterministic relative_position_index buffer, rebuilt by our Swin (docs/reference/architecture.md §2.2, §11)",
    "attn_mask": "shift-mask buffer, computed on the fly by our Swin (docs/reference/architecture.md §2.2, §11)",
    "position_ids": "deterministic position_ids buffer; RoBERTa positions are derived from the attention mask (docs/reference/architecture.md §3, §11)",
    "text_pooler": "RoBERTa pooler, never used by FIBER (docs/reference/architecture.md §8.5, §11)",
}
# Families that may be absent from the target model (variant differences), with the reason for dropping them.
_DROP_REASONS: dict[str, str] = {
    "t2i_gate": "alpha_t2i of a text layer without cross-attention: unused (docs/reference/architecture.md §7, §11); the target has none",
    "t2i_output_norm": "crossattention_t2i.output.LayerNorm is never used (docs/reference/architecture.md §6, §11); the target has none",
    "i2t_query_norm": "the target variant (fine v2) has no i2t query LayerNorm norm_i2t_i (docs/reference/architecture.md §9, §13.3)",
    "final_norm": "final Swin norm does not exist in the fine model (docs/reference/architecture.md §9, §13.3)",
    "stage_norm": "stage norms norm1-3 exist only in the fine model (docs/reference/architecture.md §2.3, §9)",
}
# Families the target may have although the source lacks them, with the initialisation the reference prescribes.
_INIT_RULES: dict[str, str] = {
    "stage_norm": "LayerNorm (1, 0): fine stage norms are new parameters (docs/reference/architecture.md §10 item 10, §13.3)",
    "final_norm": "LayerNorm (1, 0): the fine model has no final Swin norm (docs/reference/architecture.md §13.3)",
    "t2i_gate": "gate 0 (docs/reference/architecture.md §7)",
    "t2i_output_norm": "LayerNorm (1, 0) (unused parameter, docs/reference/architecture.md §11)",
    "i2t_query_norm": "LayerNorm (1, 0): the v2 source has no i2t query LayerNorm (docs/reference/architecture.md §5, §7)",
}


def _our_family(key: str) -> str | None:
    if key.startswith(OUR_IMAGE_PREFIX):
        return _family(key[len(OUR_IMAGE_PREFIX) :], _SWIN_FAMILIES)
    if key.startswith(OUR_TEXT_PREFIX):
        return _family(key[len(OUR_TEXT_PREFIX) :], _TEXT_FAMILIES)
    return None


# --------------------------------------------------------------------------------------------- reading
def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def unwrap_state_dict(obj: Any, *, ema: bool = False, where: str = "checkpoint") -> tuple[dict[str, Tensor], str]:
    """Extract the weights from an official container (docs/reference/architecture.md §13.1, §13.2).

    Args:
        obj: what ``torch.load`` returned: a Lightning dict (``state_dict``), a detector dict (``model``, optional
            ``model_ema``) or a bare state dict.
        ema: take the EMA copy ``model_ema`` of a detector checkpoint.
        where: file name used in error messages.

    Returns:
        ``(state, container)`` with ``module.`` prefixes stripped; ``container`` is ``"lightning"``,
        ``"detector"``, ``"detector-ema"`` or ``"bare"``.

    Raises:
        CheckpointFormatError: not a mapping, EMA requested but absent, or non-tensor weight entries.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{where}: expected a dict of weights, got {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), Mapping):
        raw, container = obj["state_dict"], "lightning"
    elif ema:
        if not isinstance(obj.get("model_ema"), Mapping):
            raise CheckpointFormatError(f"{where}: EMA weights requested but the file has no 'model_ema' entry")
        raw, container = obj["model_ema"], "detector-ema"
    elif isinstance(obj.get("model"), Mapping):
        raw, container = obj["model"], "detector"
    else:
        raw, container = obj, "bare"
    bad = [str(k) for k, v in raw.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointFormatError(
            f"{where}: {container} state dict has {len(bad)} non-tensor entries (e.g. {bad[:5]}); "
            "expected a Lightning 'state_dict', a detector 'model' entry or a bare state dict"
        )
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = _strip_module(str(key))
        if name in state:
            raise CheckpointFormatError(f"{where}: key {name!r} appears twice after stripping 'module.' prefixes")
        state[name] = value
    return state, container


def read_official_checkpoint(path: str | os.PathLike[str], *, ema: bool = False) -> tuple[dict[str, Tensor], str]:
    """Read an official checkpoint file safely.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (memory-mapped when the file format allows), which refuses pickled code.

    Args:
        path: ``.ckpt`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file.
        ema: take ``model_ema`` of a detector checkpoint.

    Returns:
        ``(state, container)`` as :func:`unwrap_state_dict`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: truncated/corrupt file, a file that needs pickled code, or an unknown container.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint file at {p}")
    if p.suffix == ".safetensors":
        try:
            return unwrap_state_dict(load_file(str(p)), ema=ema, where=str(p))
        except CheckpointFormatError:
            raise
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise CheckpointFormatError(f"{p}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    return unwrap_state_dict(_torch_load_safe(p), ema=ema, where=str(p))


def _torch_load_safe(p: Path) -> Any:
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Legacy (non-zip) serialisation cannot be memory-mapped; read it normally.
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err)).strip()  # torch colours its message
        # torch's first line advises weights_only=False; what follows "WeightsUnpickler error:" is the reason
        m = re.search(r"Unpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
        first = " ".join(m.group(1).split()) if m else (text.splitlines() or [type(err).__name__])[0]
        raise CheckpointFormatError(
            f"{p}: refusing to load: the file needs pickled Python objects that torch.load(weights_only=True) "
            f"does not allow, and untrusted pickles are never executed ({first})"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointFormatError(f"{p}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err


def detect_source(state: Mapping[str, Tensor], *, where: str = "state dict") -> Source:
    """Tell a coarse from a fine official checkpoint by its key families.

    Raises:
        CheckpointFormatError: when the image or text tower family of either layout is missing; the message
            lists the expected families and a few keys that were found.
    """
    found: dict[Source, tuple[bool, ...]] = {
        src: tuple(any(k.startswith(prefix) for k in state) for prefix in prefixes)
        for src, prefixes in OFFICIAL_PREFIXES.items()
    }
    for src, (has_img, has_txt) in found.items():
        if has_img and has_txt:
            return src
    lines = [f"{where} is not an official FIBER checkpoint; missing key families:"]
    for src, (img_prefix, txt_prefix) in OFFICIAL_PREFIXES.items():
        has_img, has_txt = found[src]
        missing = [
            f"{what} ('{prefix}*')"
            for what, prefix, has in (
                ("Swin image tower", img_prefix, has_img),
                ("RoBERTa text tower", txt_prefix, has_txt),
            )
            if not has
        ]
        lines.append(f"  {src}: {', '.join(missing)}")
    lines.append(f"  found keys such as: {sorted(state)[:6]}")
    raise CheckpointFormatError("\n".join(lines))


# --------------------------------------------------------------------------------------------- target model
@functools.lru_cache(maxsize=16)
def _target_shapes(config: BackboneConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    with torch.device("meta"):
        model = FiberBackbone(config)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def _table_window(rows: int, where: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise CheckpointFormatError(f"{where}: relative_position_bias_table with {rows} rows is not a (2w-1)^2 grid")
    return (side + 1) // 2


def official_target_config(
    target_variant: str, *, image_size: int | None = None, source_window: int | None = None, name: str = "fiber-base"
) -> BackboneConfig:
    """Config of the model an official checkpoint is converted for.

    Args:
        target_variant: ``"coarse" | "fine_v2" | "fine_v3" | "default"``.
        image_size: square input size of a coarse target (window ``image_size // 32``); default: the source
            resolution (``32 * source_window``), or the registry default.
        source_window: window of the source's relative-position tables.
        name: registered geometry (``fiber-base`` for the official checkpoints).
    """
    cfg = get_config(name, variant=target_variant)
    size = image_size
    if size is None and source_window is not None and cfg.swin.window_rule == "coarse":
        size = 32 * source_window
    return cfg.replace({"swin.img_size": size}) if size is not None else cfg


# --------------------------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class ConversionReport:
    """Result of :func:`convert_official_backbone`.

    Attributes:
        backbone_state: our state dict, strictly loadable into ``FiberBackbone(config)``.
        rest: non-backbone official entries, untouched (heads, FPN, ``rpn.*``), for the caller to map.
        dropped: ``official key -> reason`` for every official entry deliberately not loaded.
        initialised: our keys the source lacks, filled as the reference prescribes (see ``init_rules``).
        init_rules: ``our key -> how it was initialised``.
        resized: ``our key -> (source rows, target rows)`` of bicubically resized relative-position tables.
        key_map: ``official key -> our key`` of every mapped entry.
        source: ``"coarse"`` or ``"fine"``.
        config: configuration of the target model.
        container: how the weights were stored (``"lightning"``, ``"detector"``, ``"bare"``, ...).
        notes: human-readable remarks (e.g. how many tables were resized).
    """

    backbone_state: dict[str, Tensor]
    rest: dict[str, Tensor]
    dropped: dict[str, str]
    initialised: list[str]
    init_rules: dict[str, str]
    resized: dict[str, tuple[int, int]]
    key_map: dict[str, str]
    source: str
    config: BackboneConfig
    container: str = "state dict"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description (no tensors): counts, dropped keys with reasons, initialised, resized."""
        return {
            "source": self.source,
            "container": self.container,
            "target_variant": self.config.variant,
            "target_image_size": self.config.swin.img_size,
            "mapped": len(self.key_map),
            "rest": sorted(self.rest),
            "dropped": dict(sorted(self.dropped.items())),
            "initialised": dict(sorted(self.init_rules.items())),
            "resized": {k: list(v) for k, v in sorted(self.resized.items())},
            "notes": list(self.notes),
        }


def _fmt(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def convert_official_backbone(
    state: Mapping[str, Tensor],
    *,
    source: Source | None = None,
    target_variant: str = "coarse",
    image_size: int | None = None,
    config: BackboneConfig | None = None,
    geometry: str = "fiber-base",
    where: str = "state dict",
) -> ConversionReport:
    """Map an official coarse or fine state dict onto our backbone layout.

    Args:
        state: official weights (container already removed, e.g. by :func:`read_official_checkpoint`;
            remaining ``module.`` prefixes are stripped).
        source: ``"coarse"`` or ``"fine"``; detected from the key families when ``None``.
        target_variant: ``"coarse" | "fine_v2" | "fine_v3" | "default"`` (ignored when ``config`` is given).
        image_size: input size of a coarse target; its window is ``image_size // 32`` and the tables are resized
            bicubically when it differs from the source's (docs/reference/architecture.md §2.2). Default: the source resolution.
        config: explicit target configuration (overrides ``target_variant``, ``image_size`` and ``geometry``).
        geometry: registered backbone whose geometry the checkpoint has (``fiber-base`` for the released files;
            smaller ones for tests).
        where: name used in error messages (e.g. the file path).

    Returns:
        :class:`ConversionReport`.

    Raises:
        CheckpointFormatError: not a FIBER checkpoint, an unrecognised backbone key, a key the target cannot
            hold that is not documented as optional, a target key the source lacks without an init rule, or a
            shape mismatch (other than a resizable table).
    """
    state = {_strip_module(k): v for k, v in state.items()}
    src: Source = source or detect_source(state, where=where)
    if src not in OFFICIAL_PREFIXES:
        raise ValueError(f"source must be 'coarse' or 'fine', got {src!r}")
    img_prefix, txt_prefix = OFFICIAL_PREFIXES[src]

    # 1. classify every official key: backbone family (with our name), queue, or rest.
    mapped: dict[str, tuple[str, str]] = {}  # official -> (ours, family)
    rest: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    for key in state:
        if key.startswith(img_prefix):
            sub, ours_prefix, tables = key[len(img_prefix) :], OUR_IMAGE_PREFIX, _SWIN_FAMILIES
        elif key.startswith(txt_prefix):
            sub, ours_prefix, tables = key[len(txt_prefix) :], OUR_TEXT_PREFIX, _TEXT_FAMILIES
        elif key in QUEUE_BUFFERS:
            dropped[key] = (
                "ITC queue buffer: training state, dropped on load (docs/reference/architecture.md §11, §13.1)"
            )
            continue
        else:
            rest[key] = state[key]
            continue
        fam = _family(sub, tables)
        if fam is None:
            unknown.append(key)
        elif fam in _ALWAYS_DROPPED:
            dropped[key] = _ALWAYS_DROPPED[fam]
        else:
            mapped[key] = (ours_prefix + sub, fam)
    if unknown:
        raise CheckpointFormatError(f"{where}: unrecognised {src} backbone keys ({len(unknown)}): {_fmt(unknown)}")
    for family, what, prefix in (("swin", "Swin image tower", img_prefix), ("text", "RoBERTa text tower", txt_prefix)):
        if not any(fam == family for _, fam in mapped.values()):
            raise CheckpointFormatError(
                f"{where}: no {what} weights for a {src} checkpoint (expected keys '{prefix}*'); "
                f"found keys such as {sorted(state)[:6]}"
            )

    # 2. target model.
    if config is None:
        first_table = next((k for k, (_, f) in mapped.items() if f == "rel_pos_table"), None)
        window = _table_window(state[first_table].shape[0], first_table) if first_table else None
        config = official_target_config(target_variant, image_size=image_size, source_window=window, name=geometry)
    target = _target_shapes(config)

    # 3. map, drop optional families the target lacks, resize tables, check shapes.
    out: dict[str, Tensor] = {}
    key_map: dict[str, str] = {}
    resized: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    for key, (ours, fam) in mapped.items():
        value = state[key]
        if ours not in target:
            if fam in _DROP_REASONS:
                dropped[key] = _DROP_REASONS[fam]
            else:
                problems.append(f"{key} -> {ours}: the target model has no such parameter")
            continue
        shape = target[ours][0]
        if fam == "rel_pos_table" and value.shape != shape and value.dim() == 2 and value.shape[1] == shape[1]:
            new_window = _table_window(shape[0], ours)
            _table_window(value.shape[0], key)
            value = resize_relative_position_bias_table(value, new_window)
            resized[ours] = (state[key].shape[0], shape[0])
        if value.shape != shape:
            problems.append(f"{key}: shape {tuple(value.shape)} vs target {ours} {tuple(shape)}")
            continue
        out[ours] = value
        key_map[key] = ours
    if problems:
        raise CheckpointFormatError(
            f"{where}: does not fit the {config.variant} target (image size {config.swin.img_size}):\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... (+{len(problems) - 20})" if len(problems) > 20 else "")
        )

    # 4. target keys the source lacks: initialise when the reference says how, else fail.
    missing = [k for k in target if k not in out]
    init_rules: dict[str, str] = {}
    uninitialisable: list[str] = []
    ref = next(iter(out.values()))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    for key in missing:
        fam = _our_family(key)
        if fam not in _INIT_RULES:
            uninitialisable.append(key)
            continue
        shape = target[key][0]
        fill = 0.0 if key.endswith(".bias") or fam == "t2i_gate" else 1.0
        out[key] = torch.full(shape, fill, dtype=dtype)
        init_rules[key] = _INIT_RULES[fam]
    if uninitialisable:
        raise CheckpointFormatError(
            f"{where}: the {src} checkpoint lacks {len(uninitialisable)} weights of the {config.variant} target: "
            f"{_fmt(uninitialisable)}"
        )
    notes = []
    if resized:
        notes.append(
            f"{len(resized)} relative-position tables resized bicubically (docs/reference/architecture.md §2.2)"
        )
    return ConversionReport(
        backbone_state={k: out[k] for k in target},
        rest=rest,
        dropped=dropped,
        initialised=sorted(init_rules),
        init_rules=init_rules,
        resized=resized,
        key_map=key_map,
        source=src,
        config=config,
        notes=notes,
    )


def default_target_variant(state: Mapping[str, Tensor], source: Source) -> str:
    """Our variant matching an official checkpoint: ``coarse``; fine ``fine_v3`` when the file has ``norm_i2t_i``
    weights (RefCOCO configs), else ``fine_v2`` (docs/reference/architecture.md §9)."""
    if source == "coarse":
        return "coarse"
    return "fine_v3" if any(".attn.norm_i2t_i." in k for k in state) else "fine_v2"


def build_converted_backbone(report: ConversionReport) -> FiberBackbone:
    """A :class:`FiberBackbone` holding the converted weights (strict load, no random initialisation pass).

    The model is built on the meta device and adopts ``report.backbone_state``'s tensors (``assign=True``), so
    converting FIBER-B costs no extra ~1 GB of freshly initialised parameters.
    """
    with torch.device("meta"):
        model = FiberBackbone(report.config)
    model.load_state_dict(report.backbone_state, strict=True, assign=True)
    # Non-persistent buffers (relative_position_index, DropPath.keep_prob) were created on meta: rebuild them.
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.relative_position_index = relative_position_index(module.window)
        elif isinstance(module, DropPath):
            module.reset_buffers()
    return model


# --------------------------------------------------------------------------------------------- export
def _official_source_of(config: BackboneConfig) -> Source:
    if config.variant == "coarse":
        return "coarse"
    if config.variant in ("fine_v2", "fine_v3"):
        return "fine"
    raise ValueError(f"variant {config.variant!r} has no official counterpart (expected coarse, fine_v2 or fine_v3)")


def to_official_backbone(
    our_state: Mapping[str, Tensor],
    variant: str | BackboneConfig,
    *,
    complete: bool = False,
    geometry: str = "fiber-base",
) -> dict[str, Tensor]:
    """Rename our backbone state dict to the official key names (inverse of :func:`convert_official_backbone`).

    Args:
        our_state: ``FiberBackbone.state_dict()`` of a coarse, fine v2 or fine v3 model.
        variant: ``"coarse" | "fine_v2" | "fine_v3"`` (FIBER-B geometry, image size read from the tables) or
            the model's :class:`BackboneConfig`.
        complete: also emit what the official model stores but we do not: the deterministic buffers
            (``relative_position_index``, coarse ``attn_mask`` of shifted blocks, ``position_ids``) and, for
            coarse, the unused RoBERTa pooler (``normal(0, 0.02)`` weight, zero bias, docs/reference/architecture.md §7), so the key set
            equals the official one.
        geometry: registered geometry used when ``variant`` is a name.

    Returns:
        Official-name state dict (tensors shared with ``our_state``).

    Raises:
        ValueError: ``our_state`` does not match the variant's key set / shapes, or the variant is not official.
    """
    if isinstance(variant, BackboneConfig):
        config = variant
    else:
        table = next((v for k, v in our_state.items() if k.endswith("relative_position_bias_table")), None)
        window = _table_window(table.shape[0], "relative_position_bias_table") if table is not None else None
        config = official_target_config(variant, source_window=window, name=geometry)
    src = _official_source_of(config)
    target = _target_shapes(config)
    missing = sorted(set(target) - set(our_state))
    extra = sorted(set(our_state) - set(target))
    wrong = [k for k in target if k in our_state and our_state[k].shape != target[k][0]]
    if missing or extra or wrong:
        raise ValueError(
            f"state dict does not match a {config.variant} FiberBackbone: missing {_fmt(missing)}; "
            f"unexpected {_fmt(extra)}; wrong shapes {_fmt(wrong)}"
        )
    img_prefix, txt_prefix = OFFICIAL_PREFIXES[src]
    out: dict[str, Tensor] = {}
    for key, value in our_state.items():
        if key.startswith(OUR_IMAGE_PREFIX):
            out[img_prefix + key[len(OUR_IMAGE_PREFIX) :]] = value
        else:
            out[txt_prefix + key[len(OUR_TEXT_PREFIX) :]] = value
    if complete:
        out.update(_official_buffers(config, img_prefix, txt_prefix))
        if src == "coarse":
            hidden = config.text.hidden_size
            weight = torch.empty(hidden, hidden)
            torch.nn.init.normal_(weight, std=0.02)
            out[txt_prefix + "pooler.dense.weight"] = weight
            out[txt_prefix + "pooler.dense.bias"] = torch.zeros(hidden)
    return out


def _official_buffers(config: BackboneConfig, img_prefix: str, txt_prefix: str) -> dict[str, Tensor]:
    sw = config.swin
    out: dict[str, Tensor] = {}
    for s, depth in enumerate(sw.depths):
        window, shift = sw.stage_window(s)
        grid = sw.img_size // sw.patch_size // 2**s
        index = relative_position_index(window)
        for b in range(depth):
            out[f"{img_prefix}layers.{s}.blocks.{b}.attn.relative_position_index"] = index.clone()
            # Coarse checkpoints store the shift mask of every shifted block (fine ones compute it on the fly).
            if sw.window_rule == "coarse" and shift and b % 2 == 1:
                out[f"{img_prefix}layers.{s}.blocks.{b}.attn_mask"] = shift_window_mask(grid, grid, window, shift)
    out[txt_prefix + "embeddings.position_ids"] = torch.arange(config.text.max_position_embeddings)[None]
    return out
