"""Configs (validation, serialisation, overrides), the registry (names, variants, plugins) and the CLI."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from typing import Any

import pytest
import torch

import fiber_backbones.registry as registry
from fiber_backbones import BackboneConfig, FusionConfig, create_backbone, get_config, last_n_schedule, list_backbones
from fiber_backbones.cli import main


def test_last_n_schedule_fiber_b() -> None:
    assert last_n_schedule((2, 2, 18, 2), 12, 6) == (
        ((2, 14), 6),
        ((2, 15), 7),
        ((2, 16), 8),
        ((2, 17), 9),
        ((3, 0), 10),
        ((3, 1), 11),
    )
    assert last_n_schedule((2, 2, 18, 2), 12, 2) == (((3, 0), 10), ((3, 1), 11))
    with pytest.raises(ValueError):
        last_n_schedule((2, 2, 18, 2), 12, 13)


@pytest.mark.parametrize(
    "schedule",
    [
        (((2, 15), 7), ((2, 14), 8)),  # image side decreasing
        (((2, 14), 7), ((2, 15), 7)),  # text side repeated
    ],
)
def test_schedule_must_increase(schedule: tuple) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        FusionConfig(schedule=schedule)


def test_schedule_must_fit_towers() -> None:
    with pytest.raises(ValueError, match=r"no block \(2, 18\)"):
        BackboneConfig(fusion=FusionConfig(schedule=(((2, 18), 11),)))
    with pytest.raises(ValueError, match="12 layers"):
        BackboneConfig(fusion=FusionConfig(schedule=(((3, 1), 12),)))


def test_dict_roundtrip_and_unknown_keys() -> None:
    cfg = get_config("fiber-base", variant="fine_v3")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert BackboneConfig.from_dict(data) == cfg
    data["swin"]["windw_size"] = 7
    with pytest.raises(KeyError, match=r"swin\.windw_size"):
        BackboneConfig.from_dict(data)
    with pytest.raises(KeyError, match="text.hiden_size"):
        cfg.replace({"text.hiden_size": 8})
    with pytest.raises(KeyError, match="colour"):
        create_backbone("fiber-tiny", colour="red")


def test_variant_presets() -> None:
    coarse, v2, v3, default = (get_config("fiber-base", variant=v) for v in ("coarse", "fine_v2", "fine_v3", "default"))
    assert coarse.swin.window_rule == "coarse" and not coarse.fused_path_norms and coarse.fusion.t2i_gate_all_layers
    assert v2.swin.window_rule == "fine" and v2.swin.stage_norms and not v2.swin.final_norm
    assert not v2.fusion.i2t_query_norm and v3.fusion.i2t_query_norm
    assert v2.swin.drop_path_rate == 0.4 and coarse.swin.drop_path_rate == 0.1
    assert default.fused_path_norms and default.swin.final_norm and not default.fusion.t2i_output_norm
    assert get_config("fiber-base").variant == "coarse"


def test_overrides_dotted_and_nested() -> None:
    a = get_config("fiber-tiny", **{"text.vocab_size": 321, "swin.img_size": 96})
    b = get_config("fiber-tiny", text={"vocab_size": 321}, swin={"img_size": 96})
    assert a == b and a.text.vocab_size == 321 and a.swin.img_size == 96
    vocab: dict[str, Any] = {"text.vocab_size": 321}
    model = create_backbone("fiber-tiny", **vocab, attention_backend="eager")
    assert model.text_encoder.embeddings.word_embeddings.weight.shape == (321, 64)
    assert model.image_encoder.block(0, 0).attn.attn_backend == "eager"


def test_registry_names_and_errors() -> None:
    names = [e.name for e in list_backbones()]
    assert {"fiber-base", "fiber-swin-t", "fiber-tiny"} <= set(names)
    with pytest.raises(KeyError, match="fiber-nope"):
        create_backbone("fiber-nope")
    entry = registry.get_entry("fiber-base")
    assert entry.image_mean == (0.485, 0.456, 0.406) and entry.tokenizer == "roberta-base"
    with pytest.raises(ValueError, match="already registered"):
        registry.register_backbone("fiber-tiny")(lambda: BackboneConfig())


def test_entry_point_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="plugin-tiny", value="fiber_backbones.registry:_fiber_tiny", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after the test
    broken = EntryPoint(name="plugin-broken", value="no_such_module:factory", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [ep, broken] if group == registry.ENTRY_POINT_GROUP else []
    )
    with pytest.warns(UserWarning, match="plugin-broken"):
        names = [e.name for e in list_backbones()]
    assert "plugin-tiny" in names and "plugin-broken" not in names
    model = create_backbone("plugin-tiny", variant="fine_v2")
    assert model.config.variant == "fine_v2" and model.config.swin.img_size == 64


def test_swin_t_geometry() -> None:
    cfg = get_config("fiber-swin-t")
    assert cfg.swin.depths == (2, 2, 6, 2) and cfg.swin.embed_dim == 96
    assert cfg.fusion.schedule[0] == ((2, 2), 6) and cfg.fusion.schedule[-1] == ((3, 1), 11)


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    assert "fiber-tiny" in capsys.readouterr().out
    assert main(["info", "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "eager -- requested by" in out
    assert main(["count", "fiber-base", "--variant", "fine_v2"]) == 0
    out = capsys.readouterr().out
    assert "236,922,244" in out and "13,387,782" in out
    assert main(["count", "fiber-tiny", "--set", "text.vocab_size=50"]) == 0
    with pytest.raises(KeyError, match="nope"):
        main(["count", "fiber-tiny", "--set", "swin.nope=1"])
