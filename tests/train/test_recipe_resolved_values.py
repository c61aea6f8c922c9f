"""Every packaged recipe resolves to the values it had when this snapshot was taken (before the configuration
and optimiser/scheduler stacks were unified): the whole resolved configuration, and the learning-rate and
weight-decay factors of the schedule the trainer builds for it at sampled optimiser steps.

The snapshot is ``tests/fixtures/recipes_resolved.json``. A deliberate change of a recipe's values regenerates
it with ``python tests/train/test_recipe_resolved_values.py`` (review the diff).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from fiber_train.config import list_recipes, load_config, resolve_recipe, to_dict
from fiber_train.optim import build_optimizer, build_scheduler
from fiber_train.tasks import TASKS
from fiber_train.tasks.base import as_train_task

SNAPSHOT = Path(__file__).resolve().parents[1] / "fixtures" / "recipes_resolved.json"
FRACTIONS = (0.1, 0.25, 0.5, 0.6, 0.66, 0.67, 0.7, 0.89, 0.9, 0.95)


def _task_of(name: str) -> str:
    """The task a recipe is for: its ``task:`` entry, else the folder (coarse/, fine/) or the name's first word."""
    declared = (yaml.safe_load(resolve_recipe(name).read_text()) or {}).get("task")
    folder, stem = name.split("/", 1)
    return declared or (folder if folder in ("coarse", "fine") else stem.split("_")[0])


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _round(x: float) -> float:
    return float(f"{x:.12g}")


def _schedule(task: Any, cfg: Any) -> dict[str, list[float]]:
    """``{step: [lr factor, weight-decay factor]}`` after ``step`` scheduler steps, built as the trainer does."""
    max_steps = cfg.trainer.max_steps
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([{"params": [p], "lr": 1.0, "weight_decay": 0.5, "name": "g"}], cfg.optim)
    scheduler = task.build_scheduler(optimizer, max_steps) or build_scheduler(optimizer, cfg.optim, max_steps)
    wanted = {0, 1, 2, 10, 100, 1000, 2000, 2001, max_steps - 1} | {int(f * max_steps) for f in FRACTIONS}
    wanted = {s for s in wanted if 0 <= s < max_steps}
    out: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scheduler.step() without optimizer.step()
        for step in range(max(wanted, default=-1) + 1):
            if step in wanted:
                g = optimizer.param_groups[0]
                out[str(step)] = [_round(g["lr"]), _round(g["weight_decay"] / 0.5)]
            scheduler.step()
    return out


def resolved_values() -> dict[str, Any]:
    """Per packaged recipe: its task, flattened resolved configuration and sampled schedule."""
    out = {}
    for name in list_recipes():
        task_name = _task_of(name)
        cfg = load_config(TASKS[task_name].config, name)
        task = as_train_task(TASKS[task_name].task(cfg))
        out[name] = {"task": task_name, "config": _flat(to_dict(cfg)), "schedule": _schedule(task, cfg)}
    return out


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_every_packaged_recipe_resolves_to_its_snapshot_values() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(resolved_values()))  # the same JSON types as the snapshot
    assert sorted(got) == sorted(expected)  # a new or removed recipe updates the snapshot
    diffs = []
    for name, want in expected.items():
        have = got[name]
        if have["task"] != want["task"]:
            diffs.append(f"{name}: task {have['task']} != {want['task']}")
        for key in sorted(want["config"]):  # a setting added later is not in the snapshot
            a, b = have["config"].get(key, "<absent>"), want["config"][key]
            if not _close(a, b):
                diffs.append(f"{name}: {key} = {a!r}, snapshot {b!r}")
        if set(have["schedule"]) != set(want["schedule"]):
            diffs.append(f"{name}: sampled steps differ")
        for step, value in want["schedule"].items():
            if step in have["schedule"] and not _close(have["schedule"][step], value):
                diffs.append(f"{name}: schedule at step {step} = {have['schedule'][step]}, snapshot {value}")
    assert diffs == []


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(resolved_values(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
