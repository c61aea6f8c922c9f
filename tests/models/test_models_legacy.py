"""Model directories exported before fiber-models (``fiber_model.json`` layout) still load, with the same outputs.

The fixture ``tests/fixtures/legacy-export`` was written by the earlier fiber-train code (its
``make_legacy_export.py`` says how) together with the outputs that code's model gave. Those outputs were computed
on another CPU: matrix kernels of another instruction set round differently (seen: 3e-7 on an Intel AMX machine
against an AMD AVX512 reference), so outputs are compared at float32 rounding level (``_same``); the re-save test checks
bit for bit that the new format holds exactly the weights loaded from the old one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fiber_models
from fiber_backbones import TextInputs
from fiber_models import CoarseModel, FiberProcessor, GroundingModel, ModelFormatError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy-export"


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding across CPU kernels (a wrong weight or layer gives differences of 1e-2 and up)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6)


def test_legacy_coarse_export_loads_with_the_same_outputs() -> None:
    model = fiber_models.load(FIXTURE / "coarse")
    assert isinstance(model, CoarseModel) and not model.training
    assert model.fresh_keys == []
    ref = load_file(str(FIXTURE / "coarse_outputs.safetensors"))
    text = TextInputs(ref["input_ids"], ref["attention_mask"].bool())
    with torch.no_grad():
        _same(model.embed_images(ref["pixel_values"]), ref["image_emb"])
        _same(model.embed_texts(text), ref["text_emb"])
        _same(model.itm_scores(ref["pixel_values"], text), ref["itm"])
    assert model.info is not None and model.preprocessing is not None
    assert model.info["task"] == "coarse" and model.preprocessing.image_size == 64
    # the processor is built from the directory alone and tokenises as the training code did
    processor = FiberProcessor.from_pretrained(FIXTURE / "coarse")
    batch = processor(text=["a red circle", "a blue square"])
    assert batch.input_ids is not None and torch.equal(batch.input_ids, ref["input_ids"])


def test_legacy_grounding_export_loads_with_the_same_outputs() -> None:
    model = GroundingModel.from_pretrained(FIXTURE / "grounding")
    assert model.preprocessing is not None
    assert model.get_config().channels == 16 and model.preprocessing.resize == "shorter_side"
    ref = load_file(str(FIXTURE / "grounding_outputs.safetensors"))
    coarse_ref = load_file(str(FIXTURE / "coarse_outputs.safetensors"))
    processor = FiberProcessor.for_model(model)
    enc = processor(text=["a red circle", "a blue square"])
    assert (
        enc.input_ids is not None and enc.input_ids.shape[1] == 16
    )  # max_length padding of the exported inference settings
    with torch.no_grad():
        pyramid, hidden, _ = model.features(coarse_ref["pixel_values"], enc.text)
    _same(pyramid[0], ref["p3"])
    _same(hidden, ref["text_hidden"])


def test_legacy_export_resaves_in_the_new_format_bit_identically(tmp_path: Path) -> None:
    old = fiber_models.load(FIXTURE / "coarse")
    new_dir = old.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in new_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    new = fiber_models.load(new_dir)
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert new.info is not None and new.info["task"] == "coarse"


def test_wrong_model_type_and_missing_head_tensors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="holds a 'coarse' model, not 'grounding'"):
        GroundingModel.from_pretrained(FIXTURE / "coarse")
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE / "grounding", broken)
    (broken / "head.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no grounding head"):
        fiber_models.load(broken)


def _fine_config(pretrained: Path):
    from fiber_train.config import load_config
    from fiber_train.tasks.fine import FineConfig

    small = (
        "model.overrides={swin: {embed_dim: 8, num_heads: [1, 1, 1, 1]}, "
        "text: {hidden_size: 16, intermediate_size: 32, num_heads: 1}}"
    )
    overrides = [
        small,
        "model.backbone=fiber-tiny",
        "optim.ema_decay=0",
        f"data.tokenizer={FIXTURE / 'grounding' / 'tokenizer.json'}",
        "model.head.channels=16",
        "model.head.num_convs=1",
        f"model.pretrained={pretrained}",
    ]
    return load_config(FineConfig, None, overrides)


def test_fine_tuning_from_an_earlier_convert_output_loads_the_whole_head_or_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Earlier `fiber-train convert` wrote backbone/ + heads.safetensors (GroundingHead keys) and no model config:
    fine-tuning from it used to keep the detection head random without a word."""
    from safetensors.torch import save_file

    from fiber_train.checkpoint import CheckpointError
    from fiber_train.tasks.fine import FinePretrainTask

    old = tmp_path / "converted"
    shutil.copytree(FIXTURE / "grounding" / "backbone", old / "backbone")
    shutil.copyfile(FIXTURE / "grounding" / "head.safetensors", old / "heads.safetensors")
    ref = GroundingModel.from_pretrained(FIXTURE / "grounding")
    with caplog.at_level(logging.INFO, logger="fiber_train"):
        model = FinePretrainTask(_fine_config(old)).build_model()
    got = model.head.state_dict()
    assert len(got) == len(ref.head.state_dict())
    assert all(torch.equal(got[k], v) for k, v in ref.head.state_dict().items())
    assert f"grounding head: {len(got)} tensors loaded" in caplog.text  # logged by the task

    partial = tmp_path / "partial"
    shutil.copytree(old, partial)
    head = load_file(str(partial / "heads.safetensors"))
    save_file({k: v for k, v in head.items() if not k.startswith("dyhead_tower.")}, str(partial / "heads.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds \d+ of the \d+ grounding-head tensors .*dyhead_tower"):
        FinePretrainTask(_fine_config(partial)).build_model()
