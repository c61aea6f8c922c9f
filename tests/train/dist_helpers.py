"""Two-process CPU (gloo) runs of :func:`fiber_train.loop.fit` for the DDP / FSDP tests.

A tiny regression task (two blocks in an ``nn.ModuleList`` with dropout, a head outside it) keeps every run to a
fraction of a second of compute. Ranks are processes forked from a fork server that has imported torch,
Lightning Fabric and fiber-train once; each joins the gloo group through ``MASTER_ADDR``/``MASTER_PORT`` and
``LOCAL_RANK`` (Fabric then launches nothing itself), exactly as under ``torchrun`` or SLURM.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fiber_train.checkpoint import save_weights
from fiber_train.config import DataConfig, EvalConfig, OptimConfig, TrainerConfig
from fiber_train.optim import build_param_groups
from fiber_train.tasks.base import StepOutput

DIM = 8
SAMPLES = 64


@dataclass(frozen=True)
class TinyConfig:
    trainer: TrainerConfig
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=4, num_workers=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_ratio=0.25))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=0))


class Batch:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, device: Any) -> Batch:
        return Batch(self.x.to(device), self.y.to(device))

    def __len__(self) -> int:
        return len(self.x)


class TinyData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(SAMPLES, DIM, generator=g)
        self.y = self.x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(SAMPLES, 1, generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
    return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Dropout(0.2)) for _ in range(2)])
        self.head = nn.Linear(DIM, 1)
        self.scale = nn.Parameter(torch.tensor(1.0))  # 0-dimensional, like the ITC temperature: FSDP replicates it
        self.trace: list[Any] = []  # gradient of blocks[0].0.weight seen at each forward (gradient-sync test)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x) * self.scale

    def forward(self, batch: Batch) -> StepOutput:
        g = cast(nn.Linear, cast(nn.Sequential, self.blocks[0])[0]).weight.grad
        if g is None:
            self.trace.append(None)
        elif hasattr(g, "to_local"):
            self.trace.append("dtensor")
        else:
            self.trace.append(float(g.double().sum()))
        loss = nn.functional.mse_loss(self.predict(batch.x), batch.y)
        return StepOutput(loss=loss, logs={"mse": loss.detach()})


class TinyTask:
    name = "tiny"

    def __init__(self, config: TinyConfig) -> None:
        self.config = config
        self.model: TinyNet | None = None  # the trained model (export builds a second one under FSDP)

    def prepare_data(self) -> None:
        pass

    def build_model(self) -> TinyNet:
        model = TinyNet()
        self.model = self.model or model
        return model

    def param_groups(self, model: TinyNet) -> list[dict]:
        return build_param_groups(model, self.config.optim, {"head": model.head.parameters()})

    def train_dataset(self) -> TinyData:
        return TinyData()

    def collate_fn(self) -> Any:
        return collate

    def evaluate(self, model: TinyNet, fabric: Any) -> dict[str, float]:
        data = TinyData()
        pred = model.predict(data.x.to(fabric.device))  # not `forward`: FSDP needs the loop's unsharded()
        return {"mse": float(nn.functional.mse_loss(pred, data.y.to(fabric.device)))}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_weights({k: v for k, v in model.state_dict().items()}, Path(out_dir) / "weights.safetensors")


def _record_optimizer_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimiser post-step hook: is the AdamW state of the first block's weight a local shard?"""
    p = optimizer.param_groups[0]["params"][0]
    exp_avg = optimizer.state[p]["exp_avg"]
    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    local = exp_avg.to_local() if hasattr(exp_avg, "to_local") else exp_avg
    _OPT_STATE.update(full=int(exp_avg.numel()), local=int(local.numel()), grad_local=int(grad.numel()))


_OPT_STATE: dict[str, int] = {}


def worker(rank: int, world: int, port: int, run_dir: str, trainer: dict[str, Any], env: dict[str, str]) -> None:
    """One rank of a run: joins the group, trains with :func:`fiber_train.loop.fit`, writes ``rank<r>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        **env,
    )
    log = os.open(Path(run_dir).parent / f"{Path(run_dir).name}-rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    from fiber_train.loop import build_fabric, fit

    cfg = TinyConfig(
        trainer=TrainerConfig(accelerator="cpu", devices=world, progress=False, tensorboard="false", **trainer)
    )
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_record_optimizer_state)
    fabric = build_fabric(cfg.trainer)
    fabric.launch()
    task = TinyTask(cfg)
    result = fit(task, Path(run_dir), fabric=fabric)
    assert task.model is not None
    params = dict(task.model.named_parameters())
    weight = params["blocks.0.0.weight"]
    local = cast(Any, weight).to_local() if hasattr(weight, "to_local") else weight  # a DTensor under FSDP
    report = {
        "step": result.step,
        "metrics": result.metrics,
        "trace": task.model.trace,
        "param": {"full": int(weight.numel()), "local": int(local.numel())},
        "optimizer_state": _OPT_STATE,
    }
    (Path(run_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DistRunner:
    """Starts two-rank runs as processes forked from a preloaded fork server."""

    def __init__(self) -> None:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "lightning_fabric", "fiber_train.loop", Path(__file__).stem])

    def run(
        self, run_dir: Path, trainer: dict[str, Any], *, crash: str = "", world: int = 2, timeout: float = 120
    ) -> list[int]:
        """Run ``world`` ranks to the end, or (``crash``: ``FIBER_TEST_CRASH_IN_SAVE`` spec) until rank 0 kills
        itself inside a checkpoint save; the other ranks are then killed too (``SIGKILL``). Returns exit codes."""
        from fiber_train.checkpoint import CRASH_ENV

        port = _free_port()
        env = {CRASH_ENV: crash} if crash else {}
        procs = [
            self.ctx.Process(target=worker, args=(r, world, port, str(run_dir), trainer, env)) for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        # a rank that died (killed by the crash hook, or failed) leaves the others blocked in a collective
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.02)
        for p in procs:
            if p.is_alive():
                assert p.pid is not None
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        return [int(p.exitcode or 0) for p in procs]

    @staticmethod
    def log(run_dir: Path, rank: int = 0) -> str:
        path = Path(run_dir).parent / f"{Path(run_dir).name}-rank{rank}.log"
        return path.read_text(errors="replace") if path.is_file() else ""
