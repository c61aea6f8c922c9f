"""Two-process CPU (gloo) DDP and FSDP2 runs of the training loop: sharding, gradient accumulation without
gradient sync on non-final micro-batches, and kill-and-resume that ends bit-identical to an uninterrupted run.

Each run trains a tiny task (``dist_helpers.TinyTask``) for 4 optimiser steps of 2 micro-batches, with dropout
(RNG state per rank matters) and a checkpoint every step; ranks are killed with ``SIGKILL`` inside a checkpoint
save through the ``FIBER_TEST_CRASH_IN_SAVE`` hook of :mod:`fiber_train.checkpoint`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from dist_helpers import DistRunner
from safetensors.torch import load_file

from fiber_backbones import create_backbone
from fiber_backbones.swin import SwinStage
from fiber_train.checkpoint import SHARDED_DIR, is_sharded_checkpoint, latest_checkpoint, list_checkpoints
from fiber_train.distributed import shard_units

pytestmark = pytest.mark.integration

STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "fsdp-sharded": {"strategy": "fsdp", "fsdp_checkpoint": "sharded"},
    "fsdp-full": {"strategy": "fsdp", "fsdp_checkpoint": "full"},
}
COMMON = {"max_steps": 4, "grad_accum": 2, "ckpt_every": 1, "keep_checkpoints": 2, "log_every": 1, "seed": 0}
# where rank 0 kills itself (phase@step of the save) and the newest complete checkpoint it leaves
CRASH = {
    "ddp": ("rename@2", 2),  # step 2 committed, then SIGKILL
    "fsdp-sharded": ("state@3", 2),  # every rank's shards of step 3 written, not yet committed
    "fsdp-full": ("meta@3", 2),
}


@pytest.fixture(scope="module")
def runner() -> DistRunner:
    return DistRunner()


@pytest.fixture(scope="module")
def reference(runner: DistRunner, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs, one per strategy."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, opts in STRATEGIES.items():
        run = root / name
        codes = runner.run(run, {**COMMON, **opts})
        assert codes == [0, 0], runner.log(run, 0)[-3000:] + runner.log(run, 1)[-3000:]
        runs[name] = run
    return runs


def _report(run: Path, rank: int) -> dict[str, Any]:
    return json.loads((run / f"rank{rank}.json").read_text())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "weights.safetensors"))


def _losses(run: Path) -> list[tuple[int, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(fh)]


def test_fsdp_units_are_the_blocks_the_backbone_calls_through_forward() -> None:
    backbone = create_backbone("fiber-tiny", variant="coarse")
    names = {id(m): n for n, m in backbone.named_modules()}
    units = [names[id(u)] for u in shard_units(backbone)]
    swin_blocks = [
        f"image_encoder.layers.{s}.blocks.{b}"
        for s, stage in enumerate(backbone.image_encoder.layers)
        for b in range(len(cast(SwinStage, stage).blocks))
    ]
    text_layers = [f"text_encoder.encoder.layer.{i}" for i in range(len(backbone.text_encoder.layers))]
    assert units == swin_blocks + text_layers and len(swin_blocks) == 6
    # a Swin stage is not a unit: the backbone calls its blocks and its patch merging directly
    assert not [u for u in units if u.count(".") == 2]


def test_fsdp_shards_parameters_gradients_and_optimizer_state(reference: dict[str, Path]) -> None:
    for rank in (0, 1):
        fsdp = _report(reference["fsdp-sharded"], rank)
        assert fsdp["param"] == {"full": 64, "local": 32}  # an 8x8 weight: 4 rows per rank
        assert fsdp["optimizer_state"] == {"full": 64, "local": 32, "grad_local": 32}
        ddp = _report(reference["ddp"], rank)
        assert ddp["param"] == {"full": 64, "local": 64}
        assert ddp["optimizer_state"] == {"full": 64, "local": 64, "grad_local": 64}
    # FSDP trains the same model as DDP (same data, initial weights, dropout and averaged gradients)
    ddp, fsdp = _weights(reference["ddp"]), _weights(reference["fsdp-sharded"])
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)
    assert _report(reference["fsdp-sharded"], 0)["metrics"]["mse"] == pytest.approx(
        _report(reference["ddp"], 0)["metrics"]["mse"], rel=1e-5
    )
    # the two checkpoint layouts: per-rank shards through Fabric, or gathered full weights on rank 0
    sharded = latest_checkpoint(reference["fsdp-sharded"] / "checkpoints")
    assert sharded is not None and is_sharded_checkpoint(sharded)
    assert len(list((sharded / SHARDED_DIR).glob("*.distcp"))) == 2
    full = latest_checkpoint(reference["fsdp-full"] / "checkpoints")
    assert full is not None and not is_sharded_checkpoint(full)
    assert load_file(str(full / "model.safetensors")).keys() == ddp.keys()


def test_gradient_accumulation_skips_the_gradient_sync_on_non_final_micro_batches(reference: dict[str, Path]) -> None:
    # trace: the first block's gradient as seen at the start of each forward; odd entries follow a non-final
    # micro-batch's backward, even ones follow an optimiser step (zero_grad(set_to_none=True))
    ddp = [_report(reference["ddp"], r)["trace"] for r in (0, 1)]
    assert all(len(t) == 8 and t[0::2] == [None] * 4 for t in ddp)
    # DDP: after a non-final micro-batch each rank holds its own local gradient (an all-reduce would equalise them)
    assert all(a != pytest.approx(b) for a, b in zip(ddp[0][1::2], ddp[1][1::2], strict=True))
    # FSDP2: no reduce-scatter ran after the non-final micro-batch, so the sharded gradient is not set yet
    for r in (0, 1):
        assert _report(reference["fsdp-sharded"], r)["trace"] == [None] * 8


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_kill_and_resume_ends_bit_identical_to_the_uninterrupted_run(
    runner: DistRunner, reference: dict[str, Path], tmp_path: Path, name: str
) -> None:
    run = tmp_path / name
    opts = {**COMMON, **STRATEGIES[name]}
    crash, newest = CRASH[name]
    codes = runner.run(run, opts, crash=crash)
    assert codes[0] == -9, f"the crash hook did not fire: {codes}\n{runner.log(run, 0)[-3000:]}"
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and ckpts[-1].name == f"step_{newest:08d}"
    visible = sorted(p.name for p in (run / "checkpoints").iterdir() if ".tmp-" not in p.name)
    assert visible == [p.name for p in ckpts]  # no half-written checkpoint under a final name
    assert not (run / "model").exists()

    codes = runner.run(run, opts)
    assert codes == [0, 0], runner.log(run, 0)[-3000:] + runner.log(run, 1)[-3000:]
    assert f"resumed from {ckpts[-1]} at step {newest}" in (run / "run.log").read_text()  # rank 0's messages
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]  # stale temporaries removed
    ref, got = _weights(reference[name]), _weights(run)
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k])] == []
    assert _losses(run) == _losses(reference[name]) and len(_losses(run)) == 4
    assert _report(run, 0)["metrics"] == _report(reference[name], 0)["metrics"]
