"""trainer.compile / activation_checkpointing / fused_optimizer: wiring on the CPU, same losses as eager."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fiber_backbones import create_backbone
from fiber_train.cli import main
from fiber_train.config import TrainerConfig
from fiber_train.loop import speed_setup
from fiber_train.optim import build_optimizer, build_param_groups

TINY = [
    "data.synthetic_train=32",
    "data.synthetic_val=8",
    "data.synthetic_test=8",
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=2",
    "trainer.log_every=1",
    "trainer.progress=false",
    "trainer.deterministic=true",
    "eval.retrieval=false",
]


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@pytest.mark.integration
@pytest.mark.slow
def test_trainer_compile_trains_the_tiny_model_with_eager_losses(tmp_path: Path) -> None:
    world = tmp_path / "world"
    common = ["coarse", "--out", str(tmp_path), "--set", f"data.root={world}", *TINY]
    assert main([*common[:3], "--run-name", "eager", *common[3:], "trainer.compile=false"]) == 0
    # the dynamo front end on every block (the "eager" backend skips code generation: seconds on a CPU)
    compiled = ["trainer.compile=true", "trainer.compile_options={backend: eager}", "trainer.fused_optimizer=true"]
    assert main([*common[:3], "--run-name", "compiled", *common[3:], *compiled]) == 0
    # library messages go through logging: each run's run.log holds them
    assert "speed: compile=False (0 regions)" in (tmp_path / "eager" / "run.log").read_text()
    compiled_log = (tmp_path / "compiled" / "run.log").read_text()
    assert "speed: compile=True (15 regions), activation_checkpointing=False, fused_optimizer=True" in compiled_log
    eager, comp = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(comp) == 2 and all(torch.isfinite(torch.tensor(comp)))
    torch.testing.assert_close(torch.tensor(comp), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def test_speed_setup_defaults_and_errors() -> None:
    backbone = create_backbone("fiber-tiny")
    model = torch.nn.ModuleDict({"backbone": backbone})
    info = speed_setup(model, TrainerConfig(), torch.device("cpu"))  # auto: off on the CPU
    assert info == {"compile": False, "compiled_regions": 0, "activation_checkpointing": False}
    assert not backbone.grad_checkpointing
    info = speed_setup(model, TrainerConfig(activation_checkpointing=True), torch.device("cpu"))
    assert info["activation_checkpointing"] and backbone.grad_checkpointing
    with pytest.raises(ValueError, match="trainer.compile=true"):
        speed_setup(torch.nn.Linear(2, 2), TrainerConfig(compile=True), torch.device("cpu"))
    with pytest.raises(ValueError, match="activation_checkpointing"):
        speed_setup(torch.nn.Linear(2, 2), TrainerConfig(activation_checkpointing=True), torch.device("cpu"))
    assert speed_setup(torch.nn.Linear(2, 2), TrainerConfig(), torch.device("cuda"))["compile"] is False


def test_fused_adamw_matches_the_default_kernel() -> None:
    from fiber_train.config import OptimConfig

    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        opt = build_optimizer(build_param_groups(net, OptimConfig(lr=1e-2), {}), OptimConfig(lr=1e-2), fused=fused)
        assert opt.param_groups[0]["fused"] is (True if fused else None)
        for _ in range(3):
            net(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
