"""Whole-model conversion of official FIBER checkpoints for fiber-train (``docs/reference/architecture.md`` §8.5, §10 item 9,
§11, §13).

The backbone part is delegated to :func:`fiber_backbones.convert.convert_official_backbone`; this module maps the
remaining official entries onto fiber-train's models:

=================================================  ================================================
official key (coarse)                              ours (:class:`~fiber_models.CoarseModel`)
=================================================  ================================================
``cross_modal_{text,image}_transform.*``           ``projection.cross_modal_{text,image}_transform.*``
``cross_modal_{text,image}_pooler.dense.*``        ``projection.cross_modal_{text,image}_pooler.dense.*``
``cross_modal_{text,image}_transform_itc.*``       ``itc.cross_modal_{text,image}_transform_itc.*``
``cross_modal_{text,image}_pooler_itc.dense.*``    ``itc.cross_modal_{text,image}_pooler_itc.dense.*``
``temp``                                           ``itc.temp``
``itm_score.fc.*``                                 ``itm_score.fc.*``
``mlm_score.{bias, decoder.weight, transform.*}``  ``mlm_score.*`` (same names)
``vqa_classifier.*`` / ``nlvr2_classifier.*`` /    task-head keys (official names), loadable into
``cross_modal_att_layers.*``                       ``fiber_heads.VQAHead`` / ``NLVR2Head`` / caption adapters
``rank_output.*``                                  dropped (never trained, docs/reference/architecture.md §10 item 9); whether it
                                                   equals ``itm_score.fc`` row 1 is reported
=================================================  ================================================

Fine checkpoints: the backbone via the same converter, the detector head (``fusion_backbone.backbone.fpn.*``,
``rpn.*``) via :func:`fiber_heads.grounding.convert_official_state_dict`.

:func:`main` implements ``fiber-train convert SRC OUT_DIR``, writing the whole model in the saved format of
:mod:`fiber_models` (``config.json`` + ``model.safetensors`` [+ tokenizer files with ``--tokenizer``]): a coarse
checkpoint becomes a ``CoarseModel`` (or the VQA / NLVR2 / captioning model its task head says), a fine one a
``GroundingModel`` with every detection-head tensor. The conversion report (dropped keys with reasons,
initialised keys, resized tables, rank_output) is stored under ``info.conversion`` of ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fiber_backbones import FiberBackbone
from fiber_backbones.convert import (
    CheckpointFormatError,
    ConversionReport,
    build_converted_backbone,
    convert_official_backbone,
    default_target_variant,
    detect_source,
    read_official_checkpoint,
    unwrap_state_dict,
)
from fiber_backbones.registry import get_entry
from fiber_train.config import ConfigError

__all__ = [
    "COARSE_HEAD_KEYS",
    "ModelConversionReport",
    "convert_official_coarse",
    "convert_official_fine",
    "main",
]

RANK_OUTPUT_REASON = (
    "rank_output is initialised as a copy of itm_score.fc row 1 and never trained by any official loss; "
    "our ITM retrieval scores with the ITM head itself (docs/reference/architecture.md §10 item 9)"
)
TASK_HEAD_PREFIXES: tuple[str, ...] = ("vqa_classifier.", "nlvr2_classifier.", "cross_modal_att_layers.")


def _coarse_head_table() -> dict[str, str]:
    table: dict[str, str] = {"temp": "itc.temp", "mlm_score.bias": "mlm_score.bias"}
    table["mlm_score.decoder.weight"] = "mlm_score.decoder.weight"
    for p in ("weight", "bias"):
        for side in ("text", "image"):
            table[f"cross_modal_{side}_transform.{p}"] = f"projection.cross_modal_{side}_transform.{p}"
            table[f"cross_modal_{side}_pooler.dense.{p}"] = f"projection.cross_modal_{side}_pooler.dense.{p}"
            table[f"cross_modal_{side}_transform_itc.{p}"] = f"itc.cross_modal_{side}_transform_itc.{p}"
            table[f"cross_modal_{side}_pooler_itc.dense.{p}"] = f"itc.cross_modal_{side}_pooler_itc.dense.{p}"
        table[f"itm_score.fc.{p}"] = f"itm_score.fc.{p}"
        table[f"mlm_score.transform.dense.{p}"] = f"mlm_score.transform.dense.{p}"
        table[f"mlm_score.transform.LayerNorm.{p}"] = f"mlm_score.transform.LayerNorm.{p}"
    return table


COARSE_HEAD_KEYS: dict[str, str] = _coarse_head_table()
"""Official coarse head key -> :class:`~fiber_train.tasks.coarse.CoarseModel` key (explicit table)."""


@dataclass(frozen=True)
class ModelConversionReport:
    """What a whole-model conversion did (see :meth:`summary` for the JSON form).

    Attributes:
        kind: ``"coarse"`` or ``"fine"``.
        source: file path (or ``"state dict"``).
        backbone: the backbone report (dropped / initialised / resized backbone keys).
        head_map: ``official key -> our key`` of the mapped head entries.
        dropped: ``official key -> reason`` of dropped non-backbone entries.
        task_heads: official-named task-head tensors with no fiber-train module yet (VQA, NLVR2, caption
            adapters); load e.g. ``fiber_heads.VQAHead`` from the ``vqa_classifier.`` entries with the prefix removed.
        missing: keys of our full model that the checkpoint does not provide (left at the model's initialisation).
        rank_output: for files with ``rank_output``: whether it equals row 1 of ``itm_score.fc`` (docs/reference/architecture.md §10 item 9).
    """

    kind: str
    source: str
    backbone: ConversionReport
    head_map: dict[str, str]
    dropped: dict[str, str]
    task_heads: dict[str, Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    rank_output: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable report (no tensors)."""
        bb = self.backbone.summary()
        bb.pop("rest", None)
        return {
            "kind": self.kind,
            "source": self.source,
            "backbone": bb,
            "heads_mapped": len(self.head_map),
            "dropped": dict(sorted(self.dropped.items())),
            "task_heads": {k: list(v.shape) for k, v in sorted(self.task_heads.items())},
            "missing": sorted(self.missing),
            "rank_output": self.rank_output,
        }


def _load(source: str | os.PathLike[str] | Mapping[str, Any], ema: bool) -> tuple[dict[str, Tensor], str, str]:
    if isinstance(source, Mapping):
        state, container = unwrap_state_dict(source, ema=ema)
        return state, container, "state dict"
    state, container = read_official_checkpoint(source, ema=ema)
    return state, container, str(source)


def _rank_output_check(state: Mapping[str, Tensor]) -> dict[str, Any]:
    info: dict[str, Any] = {"present": True, "dropped": RANK_OUTPUT_REASON}
    w, b = state.get("rank_output.weight"), state.get("rank_output.bias")
    fw, fb = state.get("itm_score.fc.weight"), state.get("itm_score.fc.bias")
    if w is None or b is None or fw is None or fb is None:
        info["equals_itm_row1"] = None
        info["note"] = "itm_score.fc or part of rank_output absent: nothing to compare"
        return info
    dw = (w.float().reshape(-1) - fw[1].float()).abs().max().item()
    db = (b.float().reshape(-1) - fb[1:2].float()).abs().max().item()
    info.update({"equals_itm_row1": dw == 0.0 and db == 0.0, "max_abs_diff_weight": dw, "max_abs_diff_bias": db})
    return info


def _coarse_model_shapes(backbone: FiberBackbone, vocab_size: int, hidden_dim: int, itc_dim: int) -> dict[str, Any]:
    from fiber_models import CoarseModel

    with torch.device("meta"):
        model = CoarseModel(backbone, vocab_size=vocab_size, hidden_dim=hidden_dim, itc_dim=itc_dim, loss_weights={})
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def convert_official_coarse(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    image_size: int | None = None,
    geometry: str = "fiber-base",
) -> tuple[dict[str, Tensor], ModelConversionReport]:
    """Convert an official coarse checkpoint (pre-training, VQA, NLVR2, captioning, retrieval) for ``CoarseModel``.

    Args:
        source: ``.ckpt`` file (Lightning container) or an already loaded dict.
        image_size: target resolution (tables resized bicubically when it differs, docs/reference/architecture.md §2.2); default: the
            checkpoint's own.
        geometry: registered backbone geometry of the checkpoint (``fiber-base`` for the released files).

    Returns:
        ``(state, report)``: ``state`` holds ``backbone.*`` plus the head keys of
        :class:`~fiber_train.tasks.coarse.CoarseModel` that the file provides (load with ``strict=False`` when
        ``report.missing`` is non-empty); task heads are in ``report.task_heads``.

    Raises:
        CheckpointFormatError: not a coarse FIBER checkpoint, unrecognised keys, or mismatched shapes.
    """
    state, container, where = _load(source, ema=False)
    if detect_source(state, where=where) != "coarse":
        raise CheckpointFormatError(f"{where}: this is a fine (detector) checkpoint; use convert_official_fine")
    bb = convert_official_backbone(
        state, source="coarse", target_variant="coarse", image_size=image_size, geometry=geometry, where=where
    )
    bb = dataclasses.replace(bb, container=container)
    out = {f"backbone.{k}": v for k, v in bb.backbone_state.items()}
    head_map: dict[str, str] = {}
    dropped: dict[str, str] = {}
    task_heads: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in bb.rest.items():
        if key in COARSE_HEAD_KEYS:
            out[COARSE_HEAD_KEYS[key]] = value
            head_map[key] = COARSE_HEAD_KEYS[key]
        elif key in ("rank_output.weight", "rank_output.bias"):
            dropped[key] = RANK_OUTPUT_REASON
        elif key.startswith(TASK_HEAD_PREFIXES):
            task_heads[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointFormatError(f"{where}: unrecognised coarse keys ({len(unknown)}): {sorted(unknown)[:12]}")
    rank = _rank_output_check(bb.rest) if "rank_output.weight" in bb.rest else None

    with torch.device("meta"):
        backbone = FiberBackbone(bb.config)
    decoder = bb.rest.get("mlm_score.decoder.weight")
    text_tf = bb.rest.get("cross_modal_text_transform.weight")
    itc_tf = bb.rest.get("cross_modal_text_transform_itc.weight")
    hidden = text_tf.shape[0] if text_tf is not None else bb.config.text.hidden_size
    expected = _coarse_model_shapes(
        backbone,
        vocab_size=decoder.shape[0] if decoder is not None else bb.config.text.vocab_size,
        hidden_dim=hidden,
        itc_dim=itc_tf.shape[0] if itc_tf is not None else hidden,
    )
    bad = [
        f"{k}: {tuple(out[k].shape)} vs model {tuple(s)}" for k, s in expected.items() if k in out and out[k].shape != s
    ]
    if bad:
        raise CheckpointFormatError(f"{where}: head shapes do not fit CoarseModel: {bad[:12]}")
    missing = sorted(k for k in expected if k not in out)
    report = ModelConversionReport("coarse", where, bb, head_map, dropped, task_heads, missing, rank)
    return out, report


def convert_official_fine(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    variant: str | None = None,
    ema: bool = False,
    geometry: str = "fiber-base",
) -> tuple[dict[str, Tensor], dict[str, Tensor], ModelConversionReport]:
    """Convert an official fine (detector) checkpoint into our backbone and ``GroundingHead`` state dicts.

    Args:
        source: ``.pth`` file (detector container, ``module.`` prefixes) or an already loaded dict.
        variant: ``"fine_v2"`` / ``"fine_v3"``; default: ``fine_v3`` when the file has ``norm_i2t_i`` weights
            (RefCOCO configs), else ``fine_v2`` (docs/reference/architecture.md §9).
        ema: take the EMA copy ``model_ema`` instead of ``model``.
        geometry: registered backbone geometry of the checkpoint.

    Returns:
        ``(backbone_state, head_state, report)``; ``head_state`` loads strictly into
        ``fiber_heads.grounding.GroundingHead`` built with the checkpoint's channels.

    Raises:
        CheckpointFormatError: not a fine FIBER checkpoint, or unrecognised keys.
    """
    from fiber_heads.grounding import convert_official_state_dict

    state, container, where = _load(source, ema=ema)
    if detect_source(state, where=where) != "fine":
        raise CheckpointFormatError(f"{where}: this is a coarse (Lightning) checkpoint; use convert_official_coarse")
    variant = variant or default_target_variant(state, "fine")
    bb = convert_official_backbone(state, source="fine", target_variant=variant, geometry=geometry, where=where)
    bb = dataclasses.replace(bb, container=container)
    head: dict[str, Tensor] = {}
    head_map: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in bb.rest.items():
        renamed, skipped = convert_official_state_dict({key: value}, strict=True)
        if skipped:
            unknown.append(key)
            continue
        (ours,) = renamed
        head[ours] = value
        head_map[key] = ours
    if unknown:
        raise CheckpointFormatError(f"{where}: unrecognised fine keys ({len(unknown)}): {sorted(unknown)[:12]}")
    expected = _grounding_head_shapes(bb.config, head)
    bad = [
        f"{k}: {tuple(head[k].shape)} vs head {tuple(s)}"
        for k, s in expected.items()
        if k in head and head[k].shape != s
    ]
    extra = sorted(set(head) - set(expected))
    if bad or extra:
        raise CheckpointFormatError(f"{where}: head entries do not fit GroundingHead: {(bad + extra)[:12]}")
    missing = sorted(k for k in expected if k not in head)
    report = ModelConversionReport("fine", where, bb, head_map, {}, missing=missing)
    return bb.backbone_state, head, report


def _grounding_head_shapes(config: Any, head: Mapping[str, Tensor]) -> dict[str, torch.Size]:
    from fiber_heads.grounding import GroundingHead

    cls = head.get("cls_logits.weight")
    towers = {int(k.split(".")[1]) for k in head if k.startswith("dyhead_tower.")}
    with torch.device("meta"):
        model = GroundingHead(
            in_channels_list=tuple(config.swin.stage_dim(i) for i in config.swin.out_indices),
            text_dim=config.text.hidden_size,
            num_convs=max(towers) + 1 if towers else 6,
            num_classes=cls.shape[0] if cls is not None else 80,
        )
    return {k: v.shape for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``fiber-train convert``."""
    p = argparse.ArgumentParser(
        prog="fiber-train convert",
        description="Convert an official FIBER checkpoint (coarse .ckpt or fine .pth) into a saved fiber_models model.",
    )
    p.add_argument("src", help="official checkpoint file")
    p.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--kind", choices=("auto", "coarse", "fine"), default="auto", help="checkpoint kind")
    p.add_argument("--image-size", type=int, default=None, help="coarse target resolution (e.g. 576)")
    p.add_argument("--variant", choices=("fine_v2", "fine_v3"), default=None, help="fine variant (default: detect)")
    p.add_argument("--ema", action="store_true", help="fine: convert the EMA copy 'model_ema'")
    p.add_argument("--geometry", default="fiber-base", help="registered backbone geometry of the checkpoint")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file or folder saved with the model (the official models use roberta-base's)",
    )
    return p


def coarse_model_type(task_heads: Mapping[str, Tensor]) -> str:
    """The fiber_models type of a converted coarse checkpoint: the fine-tuned task head it carries, else coarse."""
    if any(k.startswith("vqa_classifier.") for k in task_heads):
        return "vqa"
    if any(k.startswith("nlvr2_classifier.") for k in task_heads):
        return "nlvr2"
    if any(k.startswith("cross_modal_att_layers.") for k in task_heads):
        return "caption"
    return "coarse"


def build_converted_model(state: Mapping[str, Tensor], report: ModelConversionReport) -> Any:
    """The whole fiber_models model of a converted checkpoint, every tensor loaded strictly.

    Coarse checkpoints become a :class:`fiber_models.CoarseModel` (backbone + ITC/ITM/MLM heads), or the
    fine-tuned model their task head says (:func:`coarse_model_type`: VQA, NLVR2, captioning; their unused
    pre-training heads are reported, not kept). Fine checkpoints become a :class:`fiber_models.GroundingModel`
    (backbone + the whole detection head: FPN, DyHead, token alignment, anchors).

    Raises:
        fiber_models.ModelFormatError: a tensor of the model is not in the checkpoint (named).
    """
    from fiber_models import (
        CaptionModel,
        CaptionSettings,
        CoarseModel,
        GroundingHeadConfig,
        GroundingModel,
        NLVR2Model,
        VQAModel,
    )
    from fiber_models.pretrained import strict_load

    backbone = build_converted_backbone(report.backbone)
    if report.kind == "fine":
        towers = {int(k.split(".")[2]) for k in state if k.startswith("head.dyhead_tower.")}
        head_cfg = GroundingHeadConfig(
            channels=int(state["head.bbox_pred.weight"].shape[1]),
            num_convs=max(towers) + 1 if towers else 6,
            num_classes=int(state["head.cls_logits.weight"].shape[0]),
        )
        model: Any = GroundingModel.from_config(backbone, head_cfg)
    else:
        kind = coarse_model_type(report.task_heads)
        hidden = int(state["projection.cross_modal_text_transform.weight"].shape[0])
        vocab = int(state["mlm_score.decoder.weight"].shape[0]) if "mlm_score.decoder.weight" in state else 0
        if kind == "vqa":
            rows = sorted(k for k in report.task_heads if k.startswith("vqa_classifier.") and k.endswith(".weight"))
            model = VQAModel(backbone, hidden, int(report.task_heads[rows[-1]].shape[0]))
        elif kind == "nlvr2":
            model = NLVR2Model(backbone, hidden)
        elif kind == "caption":
            special = {"bos": 0, "pad": 1, "eos": 2, "mask": vocab - 1}  # RoBERTa's ids (the official tokenizer)
            model = CaptionModel(backbone, hidden, vocab, special, CaptionSettings())
        else:
            itc = int(state["itc.cross_modal_text_transform_itc.weight"].shape[0])
            model = CoarseModel(backbone, vocab, hidden, itc, {"itc": 1.0, "itm": 1.0, "mlm": 1.0})
        own = set(model.state_dict())
        state = {k: v for k, v in {**state, **report.task_heads}.items() if k in own}
    strict_load(model, state, source=report.source)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """``fiber-train convert SRC OUT_DIR``: convert and save the whole model; returns the exit code."""
    from fiber_models import Preprocessing

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    src = Path(args.src)
    out = Path(args.out_dir)
    try:
        get_entry(args.geometry)
    except KeyError as exc:  # the registry's message lists the registered names
        raise ConfigError(f"--geometry: {exc.args[0]}") from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out} is a file; give a folder (created if needed)")
    state, container = read_official_checkpoint(src, ema=args.ema)
    kind = detect_source(state, where=str(src)) if args.kind == "auto" else args.kind
    if kind == "coarse":
        full, report = convert_official_coarse(
            {"state_dict": state}, image_size=args.image_size, geometry=args.geometry
        )
    else:
        bb_state, heads, report = convert_official_fine(state, variant=args.variant, geometry=args.geometry)
        full = {**{f"backbone.{k}": v for k, v in bb_state.items()}, **{f"head.{k}": v for k, v in heads.items()}}
    report = dataclasses.replace(
        report, source=str(src), backbone=dataclasses.replace(report.backbone, container=container)
    )
    model = build_converted_model(full, report)
    bb = report.backbone
    if kind == "fine":
        pre = Preprocessing.for_backbone(
            args.geometry, resize="shorter_side", max_text_len=256, bgr255=True, text_padding="max_length"
        )
    else:
        pre = Preprocessing.for_backbone(args.geometry, image_size=bb.config.swin.img_size, max_text_len=40)
    summary = report.summary()
    unused = sorted((set(full) | set(report.task_heads)) - set(model.state_dict()))
    summary["unused"] = unused
    model.save_pretrained(
        out,
        tokenizer=args.tokenizer,
        preprocessing=pre,
        info={"converted_from": src.name, "kind": kind, "conversion": summary},
    )
    n_head = sum(1 for k in model.state_dict() if not k.startswith("backbone."))
    print(
        f"converted {kind} checkpoint {src} -> {out} ({model.model_type} model): backbone {bb.config.variant} @ "
        f"{bb.config.swin.img_size}px, {len(bb.key_map)} backbone keys, {n_head} head tensors, "
        f"{len(bb.dropped) + len(report.dropped) + len(unused)} dropped, {len(bb.initialised)} initialised, "
        f"{len(bb.resized)} tables resized"
        + ("" if args.tokenizer else "; no tokenizer saved (pass --tokenizer DIR to make the model self-contained)")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
