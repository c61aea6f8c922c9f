"""Training sources: weighted mixtures (resumable sampler), several map-style sources, streamed tar shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fiber_data import ConcatImageTextDataset, SyntheticWorldConfig, generate_world, write_tar_shards
from fiber_train.cli import main
from fiber_train.config import CoarseConfig, ConfigError, SourceConfig, load_config
from fiber_train.data_sources import WeightedMixtureSampler, build_train_data


def test_mixture_sampler_follows_weights_and_resumes() -> None:
    sampler = WeightedMixtureSampler([100, 10, 1000], [1.0, 1.0, 2.0], seed=3, epoch_size=4000)
    draws = torch.tensor(list(sampler))
    part = torch.bucketize(draws, torch.tensor([100, 110]), right=True)
    freq = torch.bincount(part, minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.double), atol=0.03, rtol=0)
    assert draws.min() >= 0 and draws.max() < 1110
    # the small source (10 pairs) is drawn far more often than its share of pairs (10/1110)
    assert (part == 1).sum() > 800
    # deterministic and resumable
    again = WeightedMixtureSampler([100, 10, 1000], [1.0, 1.0, 2.0], seed=3, epoch_size=4000)
    again.set_position(0, 1234)
    assert torch.equal(torch.tensor(list(again)), draws[1234:])
    other_rank = WeightedMixtureSampler([100, 10, 1000], [1.0, 1.0, 2.0], seed=3, rank=1, world_size=2)
    assert not torch.equal(torch.tensor(list(other_rank))[:50], draws[:50])


def test_source_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown kind 'parquet'"):
        SourceConfig(kind="parquet", path="x")
    with pytest.raises(ValueError, match="needs `images`"):
        SourceConfig(kind="karpathy", path="x.json")
    with pytest.raises(ConfigError, match="unknown config key 'data.sources\\[0\\].wieght'"):
        load_config(CoarseConfig, None, ["data.sources=[{kind: arrow, path: a.arrow, wieght: 2}]"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("srcworld") / "w"
    generate_world(root, SyntheticWorldConfig(num_train=24, num_val=4, num_test=8), progress=False)
    return root


def test_two_map_sources_concatenate(world: Path) -> None:
    from fiber_data import ImageTransform

    srcs = [
        SourceConfig("coco-captions", str(world / "annotations/captions_train.json"), str(world / "images/train")),
        SourceConfig("karpathy", str(world / "annotations/karpathy.json"), str(world / "images"), splits=("train",)),
    ]
    data = build_train_data(srcs, ImageTransform(64), seed=0, rank=0, world_size=1)
    assert data.sizes[0] == data.sizes[1] == 72  # 24 images x 3 captions, read through two formats
    assert isinstance(data.dataset, ConcatImageTextDataset)
    assert len(data.dataset) == 144 and data.weights == []
    assert data.dataset[100].index == 100
    with pytest.raises(ValueError, match="positive weight, or none"):
        build_train_data(
            [srcs[0], SourceConfig(**{**srcs[1].__dict__, "weight": 1.0})],
            ImageTransform(64),
            seed=0,
            rank=0,
            world_size=1,
        )


TINY = [
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.log_every=1",
    "trainer.progress=false",
    "eval.retrieval=false",
]


def test_weighted_sources_train(world: Path, tmp_path: Path) -> None:
    sources = json.dumps(
        [
            {
                "kind": "coco-captions",
                "path": str(world / "annotations/captions_train.json"),
                "images": str(world / "images/train"),
                "weight": 1,
            },
            {
                "kind": "karpathy",
                "path": str(world / "annotations/karpathy.json"),
                "images": str(world / "images"),
                "splits": ["train"],
                "weight": 3,
            },
        ]
    )
    rc = main(
        [
            "coarse",
            "--out",
            str(tmp_path),
            "--run-name",
            "mix",
            "--set",
            f"data.root={world}",
            f"data.sources={sources}",
            "trainer.max_steps=2",
            *TINY,
        ]
    )
    assert rc == 0
    assert (tmp_path / "mix" / "checkpoints" / "step_00000002").is_dir()


def test_streamed_tar_shards_train_and_resume(world: Path, tmp_path: Path) -> None:
    ann = json.loads((world / "annotations/captions_train.json").read_text())
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    samples = (
        {
            "__key__": f"{a['id']:06d}",
            "png": (world / "images/train" / files[a["image_id"]]).read_bytes(),
            "txt": a["caption"],
        }
        for a in ann["annotations"]
    )
    write_tar_shards(samples, str(tmp_path / "shards" / "s-%03d.tar"), max_count=20)
    pattern = str(tmp_path / "shards" / "s-{000..003}.tar")
    sources = json.dumps([{"kind": "tar", "path": pattern}])
    args = [
        "coarse",
        "--out",
        str(tmp_path),
        "--run-name",
        "tar",
        "--set",
        f"data.root={world}",
        f"data.sources={sources}",
        *TINY,
    ]
    assert main([*args, "trainer.max_steps=3", "trainer.ckpt_every=2"]) == 0
    run = tmp_path / "tar"
    assert (run / "checkpoints" / "step_00000003").is_dir()
    # continue the stream for two more steps from the saved position
    assert main(["coarse", "--resume", str(run), "--set", "trainer.max_steps=5", "trainer.progress=false"]) == 0
    assert (run / "checkpoints" / "step_00000005").is_dir()


def test_webdataset_resampled_stream_resumes_at_its_position(world: Path, tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    from safetensors.torch import load_file

    ann = json.loads((world / "annotations/captions_train.json").read_text())
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    samples = (
        {"__key__": f"{a['id']:06d}", "png": (world / "images/train" / files[a["image_id"]]).read_bytes()}
        | {"txt": a["caption"]}
        for a in ann["annotations"]
    )
    write_tar_shards(samples, str(tmp_path / "shards" / "s-%03d.tar"), max_count=20)
    url = "pipe:cat " + str(tmp_path / "shards" / "s-{000..003}.tar")
    source = {"kind": "webdataset", "path": url, "resampled": True, "shuffle_buffer": 10}
    with pytest.raises(ValueError, match="kind webdataset only"):
        SourceConfig(kind="tar", path="x.tar", resampled=True)

    def run(name: str, *extra: str) -> Path:
        base = ["coarse", "--out", str(tmp_path), "--run-name", name, "--set", f"data.root={world}"]
        assert main([*base, f"data.sources={json.dumps([source])}", *TINY, "trainer.deterministic=true", *extra]) == 0
        return tmp_path / name

    full = run("full", "trainer.max_steps=4")
    cut = run("cut", "trainer.max_steps=4", "trainer.ckpt_every=2")
    shutil.rmtree(cut / "checkpoints" / "step_00000004")  # as if killed after the checkpoint of step 2
    shutil.rmtree(cut / "model")
    resumed = run("cut", "trainer.max_steps=4", "trainer.ckpt_every=2")  # resumes the stream after 2 steps
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
