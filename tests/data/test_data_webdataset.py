"""WebDataset-format tar shards: writer, brace expansion, rank/worker splitting, decode errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fiber_data import DataError, ImageLoadError, ImageTransform
from fiber_data.formats.tar import TarImageTextDataset, expand_shards, iter_tar_samples, write_tar_shards

T = ImageTransform(8)


def _samples(world: Path, n: int) -> list[dict]:
    caps = json.loads((world / "annotations" / "captions_train.json").read_text())
    files = {im["id"]: im["file_name"] for im in caps["images"]}
    out = []
    for k, ann in enumerate(caps["annotations"][:n]):
        out.append(
            {
                "__key__": f"{k:06d}",
                "png": (world / "images" / "train" / files[ann["image_id"]]).read_bytes(),
                "txt": ann["caption"],
                "json": {"image_id": ann["image_id"]},
            }
        )
    return out


def test_expand_shards() -> None:
    assert expand_shards("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_shards(["x.tar", "s{1..2}-{0..1}.tar"]) == ["x.tar", "s1-0.tar", "s1-1.tar", "s2-0.tar", "s2-1.tar"]


def test_round_trip_and_split_across_ranks_and_workers(tiny_world: Path, tmp_path: Path) -> None:
    samples = _samples(tiny_world, 10)
    shards = write_tar_shards(samples, str(tmp_path / "shard-%03d.tar"), max_count=3)
    assert [p.name for p in shards] == ["shard-000.tar", "shard-001.tar", "shard-002.tar", "shard-003.tar"]
    raw = list(iter_tar_samples(shards[0]))
    assert [r["__key__"] for r in raw] == ["000000", "000001", "000002"]
    assert raw[1]["png"] == samples[1]["png"] and json.loads(raw[1]["json"]) == samples[1]["json"]
    ds = TarImageTextDataset(str(tmp_path / "shard-{000..003}.tar"), T)
    got = list(ds)
    assert [s.caption for s in got] == [s["txt"] for s in samples]
    assert got[0].image.shape == (3, 8, 8) and got[0].index == -1 and got[0].image_id == "000000"
    # Two ranks see disjoint shards that together cover everything.
    r0 = [s.image_id for s in TarImageTextDataset([str(p) for p in shards], T, rank=0, world_size=2)]
    r1 = [s.image_id for s in TarImageTextDataset([str(p) for p in shards], T, rank=1, world_size=2)]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == [s.image_id for s in got]
    # DataLoader workers split the shards too (no duplicates); shuffled order depends on the epoch.
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(s.image_id for s in loader) == [s.image_id for s in got]
    shuffled = TarImageTextDataset([str(p) for p in shards], T, shuffle_shards=True, seed=0)
    orders = set()
    for epoch in range(6):
        shuffled.set_epoch(epoch)
        orders.add(tuple(shuffled.my_shards()))
    assert len(orders) > 1
    assert torch.equal(got[4].image, list(TarImageTextDataset([str(shards[1])], T))[1].image)


def test_bad_samples_raise_or_skip(tiny_world: Path, tmp_path: Path) -> None:
    samples = _samples(tiny_world, 3)
    samples[1]["png"] = b"not an image"
    del samples[2]["txt"]
    samples[2]["json"] = {"caption": "from json"}
    shard = write_tar_shards(samples, str(tmp_path / "s-%d.tar"))[0]
    with pytest.raises(ImageLoadError, match=r"s-0\.tar: record 000001: cannot decode"):
        list(TarImageTextDataset(str(shard), T))
    kept = list(TarImageTextDataset(str(shard), T, on_error="skip"))
    assert [s.caption for s in kept] == [samples[0]["txt"], "from json"]
    with pytest.raises(DataError, match="tar shard not found"):
        list(TarImageTextDataset(str(tmp_path / "missing.tar"), T))
