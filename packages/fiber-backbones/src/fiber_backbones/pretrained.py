"""Initialise the fusion backbone from uni-modal towers: a Swin image model and a RoBERTa text model (docs/reference/architecture.md §2, §3, §7).

The reference model starts from ImageNet-22k Swin-B weights and ``roberta-base``; the fusion modules (i2t / t2i
cross-attention and their zero gates) and, in the fine variants, the stage norms ``norm1-3`` are new and keep the
initialisation our model gives them at construction (docs/reference/architecture.md §7: truncated-normal / normal(0, 0.02) weights, zero
biases, LayerNorm (1, 0), gates 0).

Accepted Swin layouts (detected from the keys):

- **original release** (``model`` wrapper, as the Microsoft checkpoints): ``layers.{i}.downsample`` is the patch
  merging at the *end* of stage ``i``, classifier ``head``; this is also our layout;
- **timm >= 0.9**: patch merging at the *start* of the next stage, i.e. timm's ``layers.{i}.downsample`` is the
  original ``layers.{i-1}.downsample``; classifier ``head.fc``.

Accepted RoBERTa layouts: a Hugging Face ``RobertaModel`` / ``RobertaForMaskedLM`` state dict (``roberta.`` prefix
optional; a directory with ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin``, read with
``weights_only=True``).

Relative-position tables are resized bicubically when the window differs (e.g. 22k-384 weights, window 12, into the
576-px coarse model, window 18; docs/reference/architecture.md §2.2). Nothing is downloaded unless :func:`swin_state_from_timm` /
:func:`roberta_state_from_hub` are called explicitly (they import timm / transformers lazily).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from fiber_backbones.convert import (
    _SWIN_FAMILIES,
    _TEXT_FAMILIES,
    CheckpointFormatError,
    _family,
    _regex_table,
    _torch_load_safe,
    unwrap_state_dict,
)
from fiber_backbones.model import FiberBackbone
from fiber_backbones.weights import resize_relative_position_bias_table

__all__ = [
    "TowerLoadReport",
    "create_backbone_from_towers",
    "init_from_towers",
    "load_roberta_weights",
    "load_swin_weights",
    "read_state_dict",
    "roberta_state_from_hub",
    "swin_state_from_timm",
]

WeightsSource = str | os.PathLike[str] | Mapping[str, Tensor]

_FUSION_FAMILIES = frozenset({"i2t", "i2t_query_norm", "t2i", "t2i_gate", "t2i_output_norm"})
_SWIN_IGNORED = _regex_table(
    (r"head(\.fc)?\.(weight|bias)", "ImageNet classifier head, not part of the backbone"),
    (r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", "deterministic buffer, rebuilt by our Swin"),
    (r"layers\.\d+\.blocks\.\d+\.attn_mask", "shift-mask buffer, computed on the fly by our Swin"),
)
_TEXT_IGNORED = _regex_table(
    (r"pooler\.dense\.(weight|bias)", "RoBERTa pooler, never used by FIBER (docs/reference/architecture.md §8.5)"),
    (r"lm_head\..*", "masked-LM head of RobertaForMaskedLM, not part of the text tower"),
    (r"embeddings\.(position_ids|token_type_ids)", "deterministic buffer; positions come from the attention mask"),
)


@dataclass(frozen=True)
class TowerLoadReport:
    """What :func:`load_swin_weights` / :func:`load_roberta_weights` did.

    Attributes:
        tower: ``"swin"`` or ``"roberta"``.
        layout: detected source layout (``"timm"``, ``"swin-original"``, ``"hf-roberta"``).
        loaded: our keys that received a tensor.
        ignored: ``source key -> reason`` for source entries deliberately not loaded.
        initialised: our keys kept at their reference initialisation (fusion modules, fine stage norms).
        missing: our tower keys the source should have had but did not (empty when ``strict``).
        resized: ``our key -> (source rows, target rows)`` of bicubically resized relative-position tables.
    """

    tower: str
    layout: str
    loaded: list[str]
    ignored: dict[str, str]
    initialised: list[str]
    missing: list[str]
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable counts and key lists."""
        return {
            "tower": self.tower,
            "layout": self.layout,
            "loaded": len(self.loaded),
            "ignored": dict(sorted(self.ignored.items())),
            "initialised": sorted(self.initialised),
            "missing": sorted(self.missing),
            "resized": {k: list(v) for k, v in sorted(self.resized.items())},
        }


# --------------------------------------------------------------------------------------------- reading
def read_state_dict(source: WeightsSource) -> dict[str, Tensor]:
    """Read weights from a state dict, a file, or a Hugging Face / timm model directory, without unpickling code.

    Args:
        source: a mapping of tensors; a ``.safetensors`` file; a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file
            (``torch.load(weights_only=True)``); or a directory with ``model.safetensors``,
            ``model.safetensors.index.json`` (shards) or ``pytorch_model.bin``.

    Returns:
        The bare state dict (``model`` / ``state_dict`` wrappers and ``module.`` prefixes removed).

    Raises:
        FileNotFoundError: no weights at ``source``.
        CheckpointFormatError: unreadable file or a file that needs pickled code.
    """
    if isinstance(source, Mapping):
        return unwrap_state_dict(source, where="state dict")[0]
    p = Path(source)
    if p.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(f"{p}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if not p.is_file():
        raise FileNotFoundError(f"no weights file at {p}")
    if p.name.endswith(".index.json"):
        with open(p, encoding="utf-8") as fh:
            weight_map: dict[str, str] = json.load(fh).get("weight_map", {})
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(p.parent / shard)))
        return unwrap_state_dict(state, where=str(p))[0]
    if p.suffix == ".safetensors":
        try:
            raw: Any = load_file(str(p))
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise CheckpointFormatError(f"{p}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    else:
        raw = _torch_load_safe(p)
    return unwrap_state_dict(raw, where=str(p))[0]


# --------------------------------------------------------------------------------------------- loading
def _copy_into(
    model: FiberBackbone, values: dict[str, Tensor], where: str
) -> tuple[list[str], dict[str, tuple[int, int]]]:
    own = model.state_dict()
    resized: dict[str, tuple[int, int]] = {}
    bad: list[str] = []
    prepared: dict[str, Tensor] = {}
    for key, value in values.items():
        target = own[key]
        resizable = value.dim() == 2 and value.shape[1] == target.shape[1]
        if key.endswith("relative_position_bias_table") and value.shape != target.shape and resizable:
            window = (math.isqrt(target.shape[0]) + 1) // 2
            resized[key] = (value.shape[0], target.shape[0])
            value = resize_relative_position_bias_table(value, window)
        if value.shape != target.shape:
            bad.append(f"{key}: source {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        prepared[key] = value
    if bad:
        raise CheckpointFormatError(
            f"{where}: weights do not fit this {model.config.variant} backbone:\n  " + "\n  ".join(bad[:20])
        )
    with torch.no_grad():
        for key, value in prepared.items():
            own[key].copy_(value)
    return sorted(prepared), resized


@dataclass
class _TowerKeys:
    """The source keys of one tower load, sorted: ``values`` (model key -> tensor), ``ignored`` (source key ->
    why) and ``unknown`` (source keys), for :meth:`finish`."""

    tower: str
    layout: str
    prefix: str
    families: tuple[tuple[re.Pattern[str], str], ...]
    values: dict[str, Tensor] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def finish(self, model: FiberBackbone, *, strict: bool, where: str) -> TowerLoadReport:
        """Copy ``values`` into ``model`` and report (raising on unknown keys or missing parameters when
        ``strict``)."""
        if self.unknown and strict:
            raise CheckpointFormatError(
                f"{where}: {len(self.unknown)} {self.tower} keys not recognised (layout {self.layout}): "
                f"{self.unknown[:12]}"
            )
        for key in self.unknown:
            self.ignored[key] = "not recognised (strict=False)"
        loaded, resized = _copy_into(model, self.values, where)
        initialised: list[str] = []
        missing: list[str] = []
        for key in model.state_dict():
            if not key.startswith(self.prefix) or key in self.values:
                continue
            fam = _family(key[len(self.prefix) :], self.families)
            (initialised if fam in _FUSION_FAMILIES or fam == "stage_norm" else missing).append(key)
        if missing and strict:
            raise CheckpointFormatError(
                f"{where}: the {self.tower} weights lack {len(missing)} tower parameters of the model: {missing[:12]}"
            )
        return TowerLoadReport(self.tower, self.layout, loaded, self.ignored, initialised, missing, resized)


def load_swin_weights(model: FiberBackbone, source: WeightsSource, *, strict: bool = True) -> TowerLoadReport:
    """Load uni-modal Swin weights (timm >= 0.9 or original-release layout) into ``model.image_encoder``.

    Args:
        model: the fusion backbone (its i2t modules and stage norms keep their initialisation).
        source: state dict, file or directory (see :func:`read_state_dict`).
        strict: raise on unrecognised source keys or on image-tower parameters the source lacks.

    Returns:
        :class:`TowerLoadReport`.

    Raises:
        CheckpointFormatError: unrecognised keys / missing parameters (strict), or shapes that do not fit
            (other than resizable relative-position tables).
    """
    where = str(source) if not isinstance(source, Mapping) else "Swin state dict"
    state = read_state_dict(source)
    has_end_merge = any(k.startswith("layers.0.downsample.") for k in state)
    has_later_merge = any(re.match(r"layers\.[1-9]\d*\.downsample\.", k) for k in state)
    layout = "timm" if has_later_merge and not has_end_merge else "swin-original"
    own = model.state_dict()
    keys = _TowerKeys("swin", layout, "image_encoder.", _SWIN_FAMILIES)
    for key, value in state.items():
        name = key
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if layout == "timm" and m:
            # timm keeps the merging that ends stage i-1 at the start of stage i.
            name = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        why = _family(name, _SWIN_IGNORED)
        if why is not None:
            keys.ignored[key] = why
            continue
        fam = _family(name, _SWIN_FAMILIES)
        if fam is None or fam in _FUSION_FAMILIES or fam in ("rel_pos_index", "attn_mask"):
            keys.unknown.append(key)
        elif keys.prefix + name not in own:
            if fam == "final_norm":
                keys.ignored[key] = (
                    "this variant has no final Swin norm (fine model, docs/reference/architecture.md §9)"
                )
            else:
                keys.unknown.append(key)
        else:
            keys.values[keys.prefix + name] = value
    return keys.finish(model, strict=strict, where=where)


def load_roberta_weights(model: FiberBackbone, source: WeightsSource, *, strict: bool = True) -> TowerLoadReport:
    """Load Hugging Face RoBERTa weights into ``model.text_encoder`` (t2i modules keep their initialisation).

    Args:
        model: the fusion backbone.
        source: state dict, file or directory (``model.safetensors`` / ``pytorch_model.bin``); the ``roberta.``
            prefix of ``RobertaForMaskedLM`` checkpoints is optional.
        strict: raise on unrecognised source keys or on text-tower parameters the source lacks.

    Returns:
        :class:`TowerLoadReport`.

    Raises:
        CheckpointFormatError: unrecognised keys / missing parameters (strict) or mismatched shapes.
    """
    where = str(source) if not isinstance(source, Mapping) else "RoBERTa state dict"
    state = read_state_dict(source)
    own = model.state_dict()
    keys = _TowerKeys("roberta", "hf-roberta", "text_encoder.", _TEXT_FAMILIES)
    for key, value in state.items():
        name = key[len("roberta.") :] if key.startswith("roberta.") else key
        why = _family(name, _TEXT_IGNORED)
        if why is not None:
            keys.ignored[key] = why
            continue
        fam = _family(name, _TEXT_FAMILIES)
        if fam != "text" or keys.prefix + name not in own:
            keys.unknown.append(key)
        else:
            keys.values[keys.prefix + name] = value
    return keys.finish(model, strict=strict, where=where)


def init_from_towers(
    model: FiberBackbone,
    *,
    swin: WeightsSource | None = None,
    roberta: WeightsSource | None = None,
    strict: bool = True,
) -> dict[str, TowerLoadReport]:
    """Initialise ``model`` from uni-modal towers, the way the reference model starts pre-training (docs/reference/architecture.md §7).

    Example::

        model = create_backbone("fiber-base", **{"swin.img_size": 576})
        reports = init_from_towers(model, swin="swin_base_patch4_window12_384_22k.pth", roberta="roberta-base/")

    Args:
        model: freshly built backbone.
        swin: Swin weights (see :func:`load_swin_weights`), or ``None`` to leave the image tower as is.
        roberta: RoBERTa weights (see :func:`load_roberta_weights`), or ``None``.
        strict: passed to both loaders.

    Returns:
        ``{"swin": report, "roberta": report}`` for the towers that were loaded.
    """
    reports: dict[str, TowerLoadReport] = {}
    if swin is not None:
        reports["swin"] = load_swin_weights(model, swin, strict=strict)
    if roberta is not None:
        reports["roberta"] = load_roberta_weights(model, roberta, strict=strict)
    return reports


def create_backbone_from_towers(
    name: str,
    *,
    swin: WeightsSource | None = None,
    roberta: WeightsSource | None = None,
    strict: bool = True,
    **overrides: Any,
) -> tuple[FiberBackbone, dict[str, TowerLoadReport]]:
    """Build a registered backbone and initialise it from uni-modal towers (:func:`init_from_towers`).

    Example::

        model, reports = create_backbone_from_towers(
            "fiber-base", swin="swin_base_patch4_window12_384_22k.pth", roberta="roberta-base/", **{"swin.img_size": 576}
        )

    Args:
        name: registry name (see :func:`fiber_backbones.create_backbone`).
        swin: Swin weights or ``None``.
        roberta: RoBERTa weights or ``None``.
        strict: passed to both loaders.
        **overrides: config overrides, as for :func:`fiber_backbones.create_backbone`.

    Returns:
        ``(model, reports)``.
    """
    from fiber_backbones.registry import create_backbone

    model = create_backbone(name, **overrides)
    return model, init_from_towers(model, swin=swin, roberta=roberta, strict=strict)


# --------------------------------------------------------------------------------------------- hub (optional)
def swin_state_from_timm(name: str = "swin_base_patch4_window12_384.ms_in22k") -> dict[str, Tensor]:
    """Download a Swin through timm (needs ``timm`` and network access; never used by the tests).

    Args:
        name: timm model name with pretrained tag.

    Returns:
        The timm state dict (pass it to :func:`load_swin_weights`).
    """
    import timm  # optional dependency: fiber-backbones[timm]

    return dict(timm.create_model(name, pretrained=True).state_dict())


def roberta_state_from_hub(name: str = "FacebookAI/roberta-base") -> dict[str, Tensor]:
    """Download RoBERTa through transformers (needs ``transformers`` and network access; never used by the tests).

    Args:
        name: Hugging Face model id.

    Returns:
        The ``RobertaModel`` state dict (pass it to :func:`load_roberta_weights`).
    """
    from transformers import RobertaModel  # optional dependency: fiber-backbones[hf]

    return dict(RobertaModel.from_pretrained(name).state_dict())
