"""ImageTextCollator: shapes, dtypes, MLM consistency, and a DataLoader run over the synthetic world."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fiber_data import ByteBPETokenizer, CocoCaptionsDataset, ImageTextBatch, ImageTextCollator, ImageTransform


def test_collated_batch(tiny_world: Path, tokenizer: ByteBPETokenizer) -> None:
    ds = CocoCaptionsDataset(
        tiny_world / "annotations" / "captions_train.json", tiny_world / "images" / "train", ImageTransform(32)
    )
    collate = ImageTextCollator(tokenizer, max_length=40, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=8, shuffle=False, collate_fn=collate)
    batch = next(iter(loader))
    assert isinstance(batch, ImageTextBatch) and len(batch) == 8
    assert batch.pixel_values.shape == (8, 3, 32, 32) and batch.pixel_values.dtype == torch.float32
    for t in (batch.input_ids, batch.mlm_input_ids, batch.mlm_labels):
        assert t is not None and t.shape == (8, 40) and t.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool and batch.attention_mask.shape == (8, 40)
    assert batch.index.tolist() == list(range(8))
    assert batch.captions == tuple(ds.caption(i) for i in range(8))
    assert batch.image_ids == tuple(ds.image_id(i) for i in range(8))
    for i in range(8):
        n = int(batch.attention_mask[i].sum())
        assert tokenizer.decode(batch.input_ids[i, :n]) == batch.captions[i]
    labels, masked = batch.mlm_labels, batch.mlm_input_ids
    assert labels is not None and masked is not None
    sel = labels != -100
    assert sel.any()
    assert torch.equal(labels[sel], batch.input_ids[sel])
    assert torch.equal(masked[~sel], batch.input_ids[~sel])
    specials = torch.isin(batch.input_ids, torch.tensor([0, 1, 2]))
    assert not (sel & specials).any()
    moved = batch.to("cpu")
    assert isinstance(moved, ImageTextBatch) and torch.equal(moved.input_ids, batch.input_ids)


def test_no_mlm_and_reproducible_masks(tiny_world: Path, tokenizer: ByteBPETokenizer) -> None:
    ds = CocoCaptionsDataset(
        tiny_world / "annotations" / "captions_val.json", tiny_world / "images" / "val", ImageTransform(16)
    )
    samples = [ds[i] for i in range(4)]
    plain = ImageTextCollator(tokenizer, max_length=12, mlm=False)(samples)
    assert isinstance(plain, ImageTextBatch)
    assert plain.mlm_input_ids is None and plain.mlm_labels is None and plain.input_ids.shape == (4, 12)
    a = ImageTextCollator(tokenizer, generator=torch.Generator().manual_seed(1))(samples)
    assert isinstance(a, ImageTextBatch)
    b = ImageTextCollator(tokenizer, generator=torch.Generator().manual_seed(1))(samples)
    assert isinstance(b, ImageTextBatch)
    assert a.mlm_input_ids is not None and b.mlm_input_ids is not None
    assert a.mlm_labels is not None and b.mlm_labels is not None
    assert torch.equal(a.mlm_input_ids, b.mlm_input_ids) and torch.equal(a.mlm_labels, b.mlm_labels)
