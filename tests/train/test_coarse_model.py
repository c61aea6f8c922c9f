"""CoarseModel: shared-prefix passes equal the per-pass reference; two-process DDP uses the gathered batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fiber_backbones import create_backbone
from fiber_data import ImageTextBatch
from fiber_train.tasks.coarse import CoarseModel

VOCAB = 60


def _model(share_prefix: bool, **kw) -> CoarseModel:
    torch.manual_seed(0)
    backbone = create_backbone("fiber-tiny", text={"vocab_size": VOCAB})
    with torch.no_grad():  # non-zero gates: the fused passes really depend on both modalities
        for name, p in backbone.named_parameters():
            if "alpha" in name:
                p.fill_(0.3)
    return CoarseModel(
        backbone,
        VOCAB,
        hidden_dim=32,
        itc_dim=32,
        loss_weights={"itc": 1, "itm": 1, "mlm": 1},
        share_prefix=share_prefix,
        **kw,
    )


def _batch(n: int = 6, seed: int = 1) -> ImageTextBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, 10), generator=g)
    mask = torch.ones(n, 10, dtype=torch.bool)
    mask[::2, 7:] = False
    labels = torch.full((n, 10), -100)
    labels[:, 3] = ids[:, 3]
    masked = ids.clone()
    masked[:, 3] = 4
    return ImageTextBatch(
        pixel_values=torch.randn(n, 3, 64, 64, generator=g),
        input_ids=ids,
        attention_mask=mask,
        mlm_input_ids=masked,
        mlm_labels=labels,
        index=torch.arange(n),
        image_ids=tuple(range(n)),
        captions=tuple("x" for _ in range(n)),
    )


def test_shared_prefix_equals_per_pass_mode() -> None:
    batch = _batch()
    outs = []
    for share in (True, False):
        model = _model(share).eval()  # no dropout / drop-path: the two modes must agree to rounding
        torch.manual_seed(123)  # same hard-negative draws
        out = model(batch)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    for k in ("itc/loss", "itm/loss", "mlm/loss"):
        torch.testing.assert_close(a.logs[k], b.logs[k], rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5)


def _ddp_worker(
    fabric: Any, out_dir: str = ""
) -> None:  # a default: Fabric.launch types the function as (fabric)  # runs in each spawned process
    from fiber_train.tasks.coarse import fabric_gather

    rank = fabric.global_rank
    model = _model(True, gather=fabric_gather(fabric), rank=rank)
    model.eval()
    full = _batch(8)
    half = slice(rank * 4, rank * 4 + 4)
    assert full.mlm_input_ids is not None and full.mlm_labels is not None
    local = ImageTextBatch(
        full.pixel_values[half],
        full.input_ids[half],
        full.attention_mask[half],
        full.mlm_input_ids[half],
        full.mlm_labels[half],
        full.index[half],
        full.image_ids[half],
        full.captions[half],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = fabric.setup(model, opt)
    out = model(local)
    fabric.backward(out.loss)
    opt.step()
    loss = fabric.all_reduce(out.logs["itc/loss"].detach(), reduce_op="mean")
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"loss": float(loss), "checksum": checksum}))


@pytest.mark.slow
def test_two_process_ddp_uses_the_gathered_batch(tmp_path: Path) -> None:
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_ddp_worker, str(tmp_path))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # ranks stay in sync after an optimiser step
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)
    # the mean of the ranks' local-row losses equals the single-process ITC loss over the full batch of 8
    reference = _model(True).eval()(_batch(8)).logs["itc/loss"]
    assert r0["loss"] == pytest.approx(float(reference), rel=1e-5)
