"""Packaged fine-tuning recipes: every one loads into its task's config; the paper recipes carry the
hyper-parameters of docs/reference/training.md §2.2."""

from __future__ import annotations

import pytest

from fiber_train.cli import build_parser
from fiber_train.config import ConfigError, list_recipes, load_config
from fiber_train.tasks import TASKS

DOWNSTREAM = ("vqa", "nlvr2", "retrieval", "caption")


def test_every_finetune_recipe_loads_into_its_task_config() -> None:
    names = [n for n in list_recipes() if n.startswith("finetune/") and n.split("/")[1].split("_")[0] in DOWNSTREAM]
    assert {f"finetune/{t}_tiny" for t in DOWNSTREAM} <= set(names)
    for name in names:
        task = name.split("/")[1].split("_")[0]
        cfg = load_config(TASKS[task].config, name)
        assert cfg.task == task
        if name.endswith("_tiny"):
            assert not getattr(cfg, task).augment
    for task in DOWNSTREAM:
        assert TASKS[task].stage == "finetune" and TASKS[task].default_recipe == f"finetune/{task}_tiny"


@pytest.mark.parametrize(
    ("recipe", "task", "image", "lr", "head", "cross"),
    [
        ("finetune/vqa_fiber_b", "vqa", 576, 2e-5, 50.0, 5.0),
        ("finetune/nlvr2_fiber_b", "nlvr2", 384, 2e-5, 50.0, 5.0),
        ("finetune/retrieval_coco_itc_fiber_b", "retrieval", 576, 2e-5, 5.0, 5.0),
        ("finetune/retrieval_coco_itm_fiber_b", "retrieval", 384, 2e-5, 5.0, 5.0),
        ("finetune/caption_coco_mle_fiber_b", "caption", 576, 5e-5, 5.0, 5.0),
        ("finetune/caption_coco_cider_fiber_b", "caption", 576, 1e-6, 5.0, 5.0),
    ],
)
def test_paper_recipes_match_the_reference_table(
    recipe: str, task: str, image: int, lr: float, head: float, cross: float
) -> None:
    cfg = load_config(TASKS[task].config, recipe)
    assert cfg.data.image_size == image and cfg.data.max_text_len == 50
    assert cfg.optim.lr == pytest.approx(lr)
    assert (cfg.optim.lr_mult_head, cfg.optim.lr_mult_cross_modal) == (head, cross)
    assert cfg.optim.warmup_ratio == pytest.approx(0.1) and cfg.optim.end_lr_ratio == 0.0
    assert getattr(cfg, task).augment  # the albef_randaug training transform (docs/reference/training.md §2.1)
    if task == "vqa":
        assert cfg.vqa.answer_min_count == 9 and cfg.vqa.train_splits == ("train2014", "val2014")
    if recipe.endswith("itc_fiber_b"):
        assert cfg.retrieval.objective == "itc" and cfg.retrieval.queue_size == 4096
    if recipe.endswith("itm_fiber_b"):
        assert cfg.retrieval.objective == "itm" and cfg.retrieval.rerank_k == 0  # brute force, as the reference
    if recipe.endswith("cider_fiber_b"):
        c = cfg.caption
        assert (c.objective, c.baseline, c.num_samples, c.mle_weight, c.rl_weight) == ("cider", "fixed", 5, 0.3, 0.7)


def test_bad_settings_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="retrieval.objective"):
        load_config(TASKS["retrieval"].config, "finetune/retrieval_tiny", ["retrieval.objective=mlm"])
    with pytest.raises(ConfigError, match="caption.baseline"):
        load_config(TASKS["caption"].config, "finetune/caption_tiny", ["caption.baseline=mean"])
    with pytest.raises(ConfigError, match="unknown config key 'vqa.answer_min'"):
        load_config(TASKS["vqa"].config, "finetune/vqa_tiny", ["vqa.answer_min=3"])


def test_cli_lists_the_finetune_tasks() -> None:
    parser = build_parser()
    for task in DOWNSTREAM:
        args = parser.parse_args(["finetune", task, "--set", "trainer.max_steps=1"])
        assert args.task == task


def test_help_does_not_import_the_training_stack() -> None:
    # the parser is generated from the task table; `fiber-train --help` must not pay for torch and every task
    import subprocess
    import sys

    code = (
        "import sys, fiber_train.cli as c; p = c.build_parser(); p.format_help(); "
        "print(sorted(m for m in ('torch', 'torchvision', 'fiber_train.tasks.coarse') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    parser = build_parser()
    for task in ("refexp", "grounding", "detection"):
        assert parser.parse_args(["finetune", task]).task == task
