"""Untrusted files: crafted pickles are refused without running code; archives cannot escape their folder."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from fiber_data import DataError, iter_tar_samples, write_tar_shards
from fiber_train.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint

MARKER_NAME = "pwned"


class _Exploit:
    """Unpickling this calls ``Path(marker).touch()`` (what a hostile checkpoint would do with ``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_state_with_pickled_code_is_refused(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, _model(), {"step": 1}, {"a": 1})
    marker = tmp_path / MARKER_NAME
    torch.save({"step": 1, "payload": _Exploit(marker)}, ckpt / "state.pt")  # a zip-format torch file
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be loaded safely"):
        load_checkpoint(ckpt, _model())
    assert not marker.exists()
    # the same with a bare pickle (legacy format) in place of state.pt
    (ckpt / "state.pt").write_bytes(pickle.dumps({"step": 1, "payload": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be loaded safely"):
        load_checkpoint(ckpt, _model())
    assert not marker.exists()


def test_weights_are_safetensors_only_and_a_hostile_header_is_an_error(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, _model(), {"step": 1}, {})
    marker = tmp_path / MARKER_NAME
    # a pickle renamed to .safetensors is not unpickled
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(_model(), ckpt / "model.safetensors")
    # a header that claims 2**62 bytes, and a header whose tensor runs past the end of the file
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(_model(), ckpt / "model.safetensors")
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 10**9]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(_model(), ckpt / "model.safetensors")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_official_checkpoint_converter_refuses_pickled_code(tmp_path: Path) -> None:
    convert = pytest.importorskip("fiber_backbones.convert")
    marker = tmp_path / MARKER_NAME
    evil = tmp_path / "fiber_coarse_then_fine.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Exploit(marker)}, evil)
    with pytest.raises(convert.CheckpointFormatError, match="refusing to load"):
        convert.read_official_checkpoint(evil)
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    with pytest.raises(convert.CheckpointFormatError):
        convert.read_official_checkpoint(legacy)
    assert not marker.exists()


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_tar_reader_never_writes_or_follows_hostile_members(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    shard = tmp_path / "shards" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _member(tar, "../../escape/000000.txt", b"a caption")
        _member(tar, "/tmp/fiber-abs/000001.txt", b"another")
        _member(tar, "000002.txt", kind=tarfile.SYMTYPE, link=str(secret))
        _member(tar, "000003.txt", kind=tarfile.LNKTYPE, link=str(secret))
        _member(tar, "000004.txt", kind=tarfile.CHRTYPE)
    before = {p for p in tmp_path.rglob("*")}
    samples = list(iter_tar_samples(shard))
    # path names only become keys; nothing is created on disk and links/devices are skipped unread
    assert [s["__key__"] for s in samples] == ["../../escape/000000", "/tmp/fiber-abs/000001"]
    assert all(b"SECRET" not in v for s in samples for v in s.values() if isinstance(v, bytes))
    assert {p for p in tmp_path.rglob("*")} == before
    assert not Path("/tmp/fiber-abs").exists()


@pytest.mark.parametrize("key", ["../evil", "/abs/path", "a/../../b", "ok/./x", "", "tab\there"])
def test_tar_writer_refuses_keys_that_would_escape_on_extraction(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="unsafe tar member name"):
        write_tar_shards([{"__key__": key, "txt": "x"}], str(tmp_path / "s-%03d.tar"))
    paths = write_tar_shards([{"__key__": "sub/000001", "txt": "x"}], str(tmp_path / "ok-%03d.tar"))
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["sub/000001.txt"]


def test_tar_member_size_bomb_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fiber_data.formats.tar as wds

    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        _member(tar, "000000.txt", b"x" * 4096)
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1024)
    with pytest.raises(DataError, match=r"bomb\.tar\.gz: record 000000: member '000000\.txt' declares 4096"):
        list(iter_tar_samples(shard))


def test_tar_gz_shard_total_expansion_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many members, each under the member limit, together expanding a tiny .tar.gz far beyond its size."""
    import fiber_data.formats.tar as wds

    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        for i in range(40):  # 40 samples of 64 KiB of zeros: ~2.6 MB decompressed, a few KB on disk
            _member(tar, f"{i:06d}.txt", b"\0" * 65536)
    assert shard.stat().st_size < 20_000
    monkeypatch.setattr(wds, "MIN_SHARD_LIMIT_BYTES", 1024)  # the real floor is 256 MiB; scale the test down
    limit = wds.shard_size_limit(shard)
    assert limit == 100 * shard.stat().st_size
    seen: list[str] = []
    with pytest.raises(DataError, match=r"bomb\.tar\.gz: record 0000\d\d: the shard expands to more than") as info:
        for sample in iter_tar_samples(shard):
            seen.append(str(sample["__key__"]))
    assert "decompression bomb" in str(info.value)
    assert 0 < len(seen) < 40 and len(seen) * 65536 <= limit


def test_tar_sample_of_many_members_is_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fiber_data.formats.tar as wds

    shard = tmp_path / "wide.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(8):  # one sample key, eight members of 1 KiB each
            _member(tar, f"000000.part{i}.txt", b"y" * 1024)
    monkeypatch.setattr(wds, "MAX_SAMPLE_BYTES", 4096)
    with pytest.raises(DataError, match=r"record 000000: the members of sample '000000' hold more than 4096"):
        list(iter_tar_samples(shard))
