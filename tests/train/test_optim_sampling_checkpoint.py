from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fiber_train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fiber_train.config import OptimConfig
from fiber_train.optim import build_optimizer, build_param_groups, build_scheduler, warmup_linear_decay
from fiber_train.sampling import ResumableRandomSampler


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fusion = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.zeros(1))
        self.head = nn.Linear(4, 2)


def test_schedule_warmup_then_linear_decay() -> None:
    assert warmup_linear_decay(0, 100, 0.1) == 0.0
    assert warmup_linear_decay(5, 100, 0.1) == pytest.approx(0.5)
    assert warmup_linear_decay(10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_linear_decay(55, 100, 0.1) == pytest.approx(0.5)
    assert warmup_linear_decay(100, 100, 0.1) == pytest.approx(0.0)
    assert warmup_linear_decay(100, 100, 0.1, end_ratio=0.2) == pytest.approx(0.2)


def test_param_groups_roles_and_decay() -> None:
    m = _Toy()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, lr_mult_cross_modal=5.0, lr_mult_head=10.0)
    groups = build_param_groups(m, cfg, {"cross_modal": [*m.fusion.parameters(), m.gate], "head": m.head.parameters()})
    by_name = {g["name"]: g for g in groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert ids["base/decay"] == {id(m.body.weight)}
    assert ids["base/no_decay"] == {id(m.body.bias), id(m.norm.weight), id(m.norm.bias)}
    assert ids["cross_modal/decay"] == {id(m.fusion.weight)}
    assert ids["cross_modal/no_decay"] == {id(m.fusion.bias), id(m.gate)}
    assert by_name["cross_modal/decay"]["lr"] == pytest.approx(5e-3)
    assert by_name["head/decay"]["lr"] == pytest.approx(1e-2)
    assert by_name["base/no_decay"]["weight_decay"] == 0.0
    assert by_name["base/decay"]["weight_decay"] == pytest.approx(0.1)
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(m.parameters()))


def test_scheduler_scales_each_group_from_its_own_lr() -> None:
    m = _Toy()
    cfg = OptimConfig(lr=1.0, lr_mult_head=2.0, warmup_ratio=0.5)
    opt = build_optimizer(build_param_groups(m, cfg, {"head": m.head.parameters()}), cfg)
    sched = build_scheduler(opt, cfg, max_steps=4)
    opt.step()
    sched.step()  # step 1 of 2 warm-up steps
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["base/decay"] == pytest.approx(0.5)
    assert lrs["head/decay"] == pytest.approx(1.0)


def test_param_in_two_roles_is_rejected() -> None:
    m = _Toy()
    with pytest.raises(ValueError, match="both"):
        build_param_groups(m, OptimConfig(), {"cross_modal": [m.gate], "head": [m.gate]})


def test_sampler_resume_continues_the_same_order() -> None:
    full = ResumableRandomSampler(10, seed=3)
    epoch0 = list(full)
    epoch1 = list(full)
    assert sorted(epoch0) == list(range(10)) and epoch0 != epoch1
    resumed = ResumableRandomSampler(10, seed=3)
    resumed.set_position(0, 4)
    assert list(resumed) == epoch0[4:]
    assert list(resumed) == epoch1


def test_sampler_shards_are_disjoint_and_cover() -> None:
    shards = [list(ResumableRandomSampler(10, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(10))


def test_checkpoint_round_trip_and_pruning(tmp_path: Path) -> None:
    m = _Toy()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 4)) if False else None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, m, {"optimizer": opt.state_dict(), "step": step}, {"a": 1}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    other = _Toy()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    state, meta = load_checkpoint(latest, other)
    assert state["step"] == 3 and meta["config"] == {"a": 1}
    for a, b in zip(m.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path: Path) -> None:
    m = _Toy()
    save_checkpoint(tmp_path, 1, m, {"step": 1}, {})
    # a crash in the middle of writing step 2 leaves a temporary directory without meta.json
    partial = tmp_path / "step_00000002.tmp-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    # and a directory with the final name but no meta.json (e.g. copied by hand) is not complete either
    (tmp_path / "step_00000003").mkdir()
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_00000001"
    save_checkpoint(tmp_path, 4, m, {"step": 4}, {})
    assert not partial.exists()


def test_checkpoint_of_another_model_is_rejected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _Toy(), {"step": 1}, {})
    with pytest.raises(CheckpointError, match=r"missing keys: .*extra|unexpected keys: .*fusion"):
        load_checkpoint(tmp_path / "step_00000001", nn.Sequential(nn.Linear(4, 4)))


def test_truncated_weights_are_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _Toy(), {"step": 1}, {})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path, _Toy())


def test_pickled_code_in_state_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _Toy(), {"step": 1}, {})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"step": 1, "x": Evil()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path, _Toy())
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert a == b
    # and the state survives a weights_only round trip through torch.save
    import io

    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert json.dumps({"ok": True})


def test_write_dir_atomically_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path: Path) -> None:
    from fiber_train.checkpoint import write_dir_atomically

    def good(text: str):
        def write(out: Path) -> None:
            out.mkdir()
            (out / "weights.txt").write_text(text)

        return write

    target = tmp_path / "best"
    write_dir_atomically(target, good("v1"))
    assert (target / "weights.txt").read_text() == "v1"

    def crash(out: Path) -> None:
        out.mkdir()
        (out / "weights.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomically(target, crash)
    assert (target / "weights.txt").read_text() == "v1"  # the previous export survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no partial directory left behind
    write_dir_atomically(target, good("v2"))
    assert (target / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
