"""Streaming shards through the ``webdataset`` package (fiber_data.streaming): local paths, ``pipe:`` and
http URLs, rank/worker splitting, resampling, the shuffle buffer, the resume position and the safety limits."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fiber_data import DataError, ImageTransform
from fiber_data.formats.streaming import WebDatasetImageText, expand_urls, iter_url_samples
from fiber_data.formats.tar import write_tar_shards

pytest.importorskip("webdataset")

T = ImageTransform(8)
N = 24  # samples in 4 shards of 6


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("wds")
    samples = [{"__key__": f"{i:06d}", "jpg": _jpeg(i), "txt": f"caption {i}", "json": {"i": i}} for i in range(N)]
    return write_tar_shards(samples, str(root / "shard-%06d.tar"), max_count=6)


def _pattern(shards: list[Path]) -> str:
    return str(shards[0].parent / "shard-{000000..000003}.tar")


def _ids(ds: WebDatasetImageText) -> list[int | str]:
    return [s.image_id for s in ds]


def test_local_paths_brace_patterns_and_decoding(shards: list[Path]) -> None:
    assert expand_urls(_pattern(shards)) == [str(p) for p in shards]
    assert expand_urls("a-{0,7}.tar::b.tar") == ["a-0.tar", "a-7.tar", "b.tar"]
    got = list(WebDatasetImageText(_pattern(shards), T, shuffle_shards=False))
    assert [s.image_id for s in got] == [f"{i:06d}" for i in range(N)]
    assert [s.caption for s in got] == [f"caption {i}" for i in range(N)]
    assert got[0].image.shape == (3, 8, 8) and got[0].index == -1


def test_pipe_and_http_urls_read_the_same_samples(shards: list[Path]) -> None:
    want = [(r["__key__"], r["jpg"], r["txt"]) for r in iter_url_samples(str(shards[1]))]
    assert len(want) == 6
    piped = list(iter_url_samples(f"pipe:cat {shards[1]}"))
    assert [(r["__key__"], r["jpg"], r["txt"]) for r in piped] == want
    assert piped[0]["__url__"] == f"pipe:cat {shards[1]}"
    handler = functools.partial(_QuietHandler, directory=str(shards[1].parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            fetched = list(iter_url_samples(f"{base}/{shards[1].name}"))
            assert [(r["__key__"], r["jpg"], r["txt"]) for r in fetched] == want
            with pytest.raises(DataError, match=r"missing\.tar: unreadable tar stream"):
                list(iter_url_samples(f"{base}/missing.tar"))  # HTTP 404: curl fails, no samples
        finally:
            server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_unopenable_and_broken_shards_name_the_url(shards: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.tar"):
        list(iter_url_samples(str(tmp_path / "nope.tar")))
    with pytest.raises(DataError, match=r"pipe:exit 3: unreadable tar stream"):
        list(iter_url_samples("pipe:exit 3"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shards[0].read_bytes()[:1500])  # inside the first image's data
    with pytest.raises(DataError, match=r"cut\.tar: unreadable tar stream"):
        list(iter_url_samples(str(cut)))


def test_split_by_rank_and_worker_covers_every_sample_once(shards: list[Path]) -> None:
    seen: list[str] = []
    for rank in range(2):
        ds = WebDatasetImageText(_pattern(shards), T, rank=rank, world_size=2, seed=3)
        ids = [s.image_id for s in DataLoader(ds, batch_size=None, num_workers=2)]
        assert len(ids) == N // 2  # 2 shards of 6 per rank, one per worker
        seen += ids
    assert sorted(seen) == [f"{i:06d}" for i in range(N)]


def test_shuffle_buffer_is_seeded_and_reorders_within_the_stream(shards: list[Path]) -> None:
    plain = _ids(WebDatasetImageText(_pattern(shards), T, seed=1))
    a = _ids(WebDatasetImageText(_pattern(shards), T, seed=1, shuffle_buffer=8))
    b = _ids(WebDatasetImageText(_pattern(shards), T, seed=1, shuffle_buffer=8))
    c = _ids(WebDatasetImageText(_pattern(shards), T, seed=2, shuffle_buffer=8))
    assert a == b and sorted(a) == sorted(plain) and a != plain and a != c
    ds = WebDatasetImageText(_pattern(shards), T, seed=1, shuffle_buffer=8)
    ds.set_epoch(1)
    assert _ids(ds) != a and sorted(_ids(ds)) == sorted(a)


def test_resampled_shards_are_drawn_with_replacement_per_rank(shards: list[Path]) -> None:
    def first(rank: int, seed: int = 0, n: int = 60) -> list[str]:
        ds = WebDatasetImageText(_pattern(shards), T, resampled=True, seed=seed, rank=rank, world_size=2)
        return [s.image_id for s in _take(iter(ds), n)]

    r0 = first(0)
    assert r0 == first(0)  # deterministic
    assert r0 != first(1) and r0 != first(0, seed=1)  # another rank, another seed: other draws
    counts = {k: r0.count(k) for k in set(r0)}
    assert max(counts.values()) > 1  # 60 samples from 24: shards were drawn again (with replacement)
    assert len(r0) == 60  # and the stream does not end


def _take(it: Iterator, n: int) -> list:
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_continues_the_stream_where_it_stopped(shards: list[Path], workers: int) -> None:
    def loader() -> tuple[WebDatasetImageText, DataLoader]:
        ds = WebDatasetImageText(_pattern(shards), T, resampled=True, shuffle_buffer=5, seed=7)
        return ds, DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=lambda b: [s.image_id for s in b])

    _, full = loader()
    want = _take(iter(full), 9)
    ds, resumed = loader()
    ds.set_resume_position(5, batch_size=3, num_workers=workers)
    assert _take(iter(resumed), 4) == want[5:]
    with pytest.raises(ValueError, match="resampled"):
        WebDatasetImageText(_pattern(shards), T).set_resume_position(1, 3, 0)


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if data else None)


def test_safety_limits_member_size_and_links(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    shard = tmp_path / "evil.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        _member(tar, "000000.txt", b"a caption")
        _member(tar, "000001.txt", kind=tarfile.SYMTYPE, link=str(secret))
        _member(tar, "000002.txt", kind=tarfile.LNKTYPE, link=str(secret))
        _member(tar, "000003.txt", b"x" * 4096)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(DataError, match=r"evil\.tar\.gz: record 000003: member '000003\.txt' declares 4096"):
        list(iter_url_samples(f"pipe:cat {shard}", max_member_bytes=1024))
    samples = list(iter_url_samples(str(shard)))
    assert [s["__key__"] for s in samples] == ["000000", "000003"]  # links skipped unread
    assert all(b"SECRET" not in v for s in samples for v in s.values() if isinstance(v, bytes))
    assert set(tmp_path.rglob("*")) == before
