"""Read-only support for model directories exported by fiber-train before the one saved format.

That layout was::

    fiber_model.json                {"task": ..., "config": <training config>, ["grounding_head", "inference"]}
    backbone/{config.json, model.safetensors}
    heads.safetensors               coarse and downstream tasks (every non-backbone tensor)
    head.safetensors                grounding tasks (the GroundingHead, keys without the ``head.`` prefix)
    [answers.json]                  VQA answer list; [ema.safetensors] grounding EMA weights
    tokenizer.json

:func:`legacy_config` translates ``fiber_model.json`` (and tensor shapes where the training config does not
say) into the ``config.json`` dict of :mod:`fiber_models.pretrained`; :func:`legacy_state_dict` assembles the
full state dict. Nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

__all__ = ["LEGACY_META", "is_legacy_model", "legacy_config", "legacy_state_dict"]

LEGACY_META = "fiber_model.json"
_GROUNDING_TASKS = {"fine", "refexp", "grounding", "detection"}
_TASK_TO_TYPE = {"coarse": "coarse", "vqa": "vqa", "nlvr2": "nlvr2", "retrieval": "retrieval", "caption": "caption"}


def is_legacy_model(path: str | Path) -> bool:
    """Whether ``path`` is a directory in the earlier export layout."""
    p = Path(path)
    return (p / LEGACY_META).is_file() and (p / "backbone").is_dir()


def _error(model_dir: Path, message: str) -> Exception:
    from fiber_models.pretrained import ModelFormatError

    return ModelFormatError(f"{model_dir} ({LEGACY_META} layout): {message}")


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(file), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iteration


def legacy_config(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` dict (with ``"legacy": true``) equivalent to a legacy export.

    Raises:
        ModelFormatError: unreadable ``fiber_model.json``, an unknown task, or a missing weights file.
    """
    try:
        meta = json.loads((model_dir / LEGACY_META).read_text())
        backbone = json.loads((model_dir / "backbone" / "config.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise _error(model_dir, f"unreadable ({exc})") from exc
    task = str(meta.get("task", ""))
    train = meta.get("config", {}) or {}
    model = train.get("model", {}) or {}
    data = train.get("data", {}) or {}
    text_pool = str(model.get("text_pool", "first"))
    info = {"task": task, "config": train, "converted_from": "fiber_model.json layout"}
    if "init" in meta:
        info["init"] = meta["init"]
    out: dict[str, Any] = {"legacy": True, "backbone": backbone, "info": info}
    if task in _GROUNDING_TASKS or "grounding_head" in meta:
        if "grounding_head" not in meta or not (model_dir / "head.safetensors").is_file():
            raise _error(model_dir, "no grounding head (fiber_model.json 'grounding_head' and head.safetensors)")
        inf = dict(meta.get("inference", {}))
        pre: dict[str, Any] = {
            "resize": "shorter_side",
            "max_text_len": int(inf.get("max_text_len", data.get("max_text_len", 256))),
            "text_pool": text_pool,
            "test_size": int(inf.get("test_size", 800)),
            "max_size": inf.get("max_size", 1333),
            "size_divisibility": int(inf.get("size_divisibility", 32)),
            "bgr255": bool(inf.get("bgr255", True)),
            "text_padding": str(inf.get("text_padding", "max_length")),
        }
        out.update(model_type="grounding", head=dict(meta["grounding_head"]), preprocessing=pre)
        return out
    if task not in _TASK_TO_TYPE:
        raise _error(model_dir, f"unknown task {task!r}")
    heads = model_dir / "heads.safetensors"
    if not heads.is_file():
        raise _error(model_dir, "no heads.safetensors")
    shapes = _shapes(heads)
    hidden = int(model.get("hidden_dim", shapes["projection.cross_modal_image_transform.weight"][0]))
    head: dict[str, Any]
    if task == "coarse":
        loss = train.get("loss", {}) or {}
        head = {
            "vocab_size": shapes["mlm_score.decoder.weight"][0],
            "hidden_dim": hidden,
            "itc_dim": shapes["itc.cross_modal_image_transform_itc.weight"][0],
            "loss_weights": {k: float(loss.get(k, 1.0)) for k in ("itc", "itm", "mlm")},
            "queue_size": int(loss.get("queue_size", 0)),
            "temperature_init": float(loss.get("temperature_init", 0.07)),
            "share_prefix": bool(model.get("share_prefix", True)),
            "text_pool": text_pool,
        }
    elif task == "vqa":
        answers: list[str] = []
        if (model_dir / "answers.json").is_file():
            from fiber_data import AnswerVocab

            answers = list(AnswerVocab.load(model_dir / "answers.json").answers)
        num = _last_layer_rows(shapes, "vqa_classifier.")
        head = {"hidden_dim": hidden, "num_answers": num, "answers": answers, "text_pool": text_pool}
    elif task == "nlvr2":
        head = {"hidden_dim": hidden, "text_pool": text_pool}
    elif task == "retrieval":
        r = train.get("retrieval", {}) or {}
        head = {
            "hidden_dim": hidden,
            "itc_dim": shapes["itc.cross_modal_image_transform_itc.weight"][0],
            "objective": str(r.get("objective", "itc")),
            "queue_size": int(r.get("queue_size", 0)),
            "temperature_init": float(r.get("temperature_init", 0.07)),
            "text_pool": text_pool,
        }
    else:  # caption
        from fiber_data import load_tokenizer

        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise _error(model_dir, "a caption model needs its tokenizer.json (special token ids)")
        tok = load_tokenizer(tok_file)
        special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "mask": tok.mask_token_id}
        head = {
            "hidden_dim": hidden,
            "vocab_size": shapes["mlm_score.decoder.weight"][0],
            "special_ids": special,
            "settings": dict(train.get("caption", {}) or {}),
            "text_pool": text_pool,
        }
    out.update(
        model_type=_TASK_TO_TYPE[task],
        head=head,
        preprocessing={
            "image_size": int(data.get("image_size", 384)),
            "max_text_len": int(data.get("max_text_len", 40)),
            "text_pool": text_pool,
        },
    )
    return out


def _last_layer_rows(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Output rows of the last linear layer under ``prefix`` (the highest-numbered ``*.weight`` of 2 dims)."""
    weights = sorted(k for k, v in shapes.items() if k.startswith(prefix) and len(v) == 2)
    if not weights:
        raise KeyError(f"no {prefix}* weights")
    return int(shapes[weights[-1]][0])


def legacy_state_dict(model_dir: Path, config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The full model state dict of a legacy export (``backbone.*`` + the head file)."""
    try:
        state = {f"backbone.{k}": v for k, v in load_file(str(model_dir / "backbone" / "model.safetensors")).items()}
        if config["model_type"] == "grounding":
            state.update({f"head.{k}": v for k, v in load_file(str(model_dir / "head.safetensors")).items()})
        else:
            state.update(load_file(str(model_dir / "heads.safetensors")))
    except Exception as exc:  # safetensors raises its own error types
        raise _error(model_dir, f"unreadable weights ({exc})") from exc
    return state
