from __future__ import annotations

from pathlib import Path

import pytest

from fiber_train.config import (
    CoarseConfig,
    ConfigError,
    list_recipes,
    load_config,
    parse_overrides,
    to_dict,
)


def test_overrides_parse_into_typed_values() -> None:
    cfg = load_config(CoarseConfig, None, ["optim.lr=1e-4", "data.batch_size=8", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8
    assert cfg.optim.betas == (0.9, 0.95)


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean lr"):
        load_config(CoarseConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'nosuchsection'"):
        load_config(CoarseConfig, None, ["nosuchsection.x=1"])


def test_wrong_type_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer"):
        load_config(CoarseConfig, None, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"trainer\.nonfinite must be"):
        load_config(CoarseConfig, None, ["trainer.nonfinite=ignore"])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["optim.lr"])


def test_recipe_round_trip(tmp_path: Path) -> None:
    import yaml

    cfg = load_config(CoarseConfig, "coarse/tiny", ["trainer.max_steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    again = load_config(CoarseConfig, path)
    assert again == cfg
    assert again.trainer.max_steps == 7


def test_packaged_recipes_all_load() -> None:
    import yaml

    from fiber_train.config import resolve_recipe
    from fiber_train.tasks import TASKS

    names = list_recipes()
    assert "coarse/tiny" in names and "coarse/fiber_b_4m" in names
    for spec_name, spec in TASKS.items():  # every task's default recipe is packaged
        assert spec.default_recipe in names, spec_name
    for name in names:
        # the task a recipe is for: its `task:` entry, else the folder (coarse/, fine/) or the name's first word
        declared = (yaml.safe_load(resolve_recipe(name).read_text()) or {}).get("task")
        folder, stem = name.split("/", 1)
        task = declared or (folder if folder in ("coarse", "fine") else stem.split("_")[0])
        cfg = load_config(TASKS[task].config, name)
        assert getattr(cfg, "task", task) == task, name


def test_unknown_key_in_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        load_config(CoarseConfig, path)


def test_missing_recipe_lists_packaged_ones() -> None:
    with pytest.raises(FileNotFoundError, match="coarse/tiny"):
        load_config(CoarseConfig, "coarse/nope")


def test_override_values_that_are_paths_stay_strings() -> None:
    from fiber_train.config import parse_overrides

    got = parse_overrides(["data.ann={split}/_annotations.coco.json", "data.images={split}", "a.b=x: [y"])
    assert got == {"data": {"ann": "{split}/_annotations.coco.json", "images": "{split}"}, "a": {"b": "x: [y"}}
    # YAML values that contain the placeholder inside quotes are still parsed
    assert parse_overrides(["data.sources=[{name: a, ann: 'x/{split}.json'}]"]) == {
        "data": {"sources": [{"name": "a", "ann": "x/{split}.json"}]}
    }
    # a string where a number is expected is still an error naming the key
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(CoarseConfig, None, ["optim.lr=x: [y"])


def test_image_decoder_setting_selects_the_transform() -> None:
    from fiber_data import ImageTransform
    from fiber_data.images.tv_decode import TorchvisionImageTransform
    from fiber_train.tasks.coarse import CoarsePretrainTask

    cfg = load_config(CoarseConfig, None, ["data.image_decoder=torchvision", "data.image_size=32"])
    transform = CoarsePretrainTask(cfg).image_transform()
    assert isinstance(transform, TorchvisionImageTransform) and transform.size == 32
    assert type(CoarsePretrainTask(load_config(CoarseConfig, None, [])).image_transform()) is ImageTransform
    with pytest.raises(ConfigError, match="image_decoder must be 'pil' or 'torchvision'"):
        load_config(CoarseConfig, None, ["data.image_decoder=opencv"])
