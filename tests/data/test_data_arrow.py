"""Arrow caption tables: Karpathy → Arrow writer, memory-mapped reader, dedup, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fiber_data import AnnotationError, ImageLoadError, ImageTransform, KarpathyCaptionsDataset

pa = pytest.importorskip("pyarrow")

from fiber_data.formats.arrow import ArrowCaptionDataset, karpathy_to_arrow, read_arrow_table, write_caption_table  # noqa: E402

T = ImageTransform(16)


def test_karpathy_round_trip_through_arrow(tiny_world: Path, tmp_path: Path) -> None:
    files = karpathy_to_arrow(
        tiny_world / "annotations" / "karpathy.json", tiny_world / "images", tmp_path, dataset="synth"
    )
    assert [f.name for f in files] == [f"synth_caption_karpathy_{s}.arrow" for s in ("train", "val", "test")]
    table = read_arrow_table(files[1])
    assert table.column_names == ["image", "caption", "image_id", "split"] and table.num_rows == 6
    arrow = ArrowCaptionDataset(files[1:2], T)
    ref = KarpathyCaptionsDataset(
        tiny_world / "annotations" / "karpathy.json", tiny_world / "images", T, splits=["val"]
    )
    assert len(arrow) == len(ref) == 18
    for i in (0, 7, 17):
        a, b = arrow[i], ref[i]
        assert a.caption == b.caption and torch.equal(a.image, b.image)
        assert a.image_id == Path(ref.table.image_paths[int(ref.table.text_to_image[i])]).name


def test_dedup_large_string_and_errors(tmp_path: Path, tiny_world: Path) -> None:
    png = next((tiny_world / "images" / "val").iterdir()).read_bytes()
    path = write_caption_table(
        tmp_path / "t.arrow", [png, b"junk"], [["a", "b", "a"], ["c"]], ["x.png", "y.png"], "train"
    )
    ds = ArrowCaptionDataset([path], T)
    assert [ds.caption(i) for i in range(len(ds))] == ["a", "b", "c"]
    assert len(ArrowCaptionDataset([path], T, deduplicate=False)) == 4
    with pytest.raises(ImageLoadError, match=r"t\.arrow: record row 1: cannot decode image bytes"):
        ds[2]
    # A table written with large_string captions (other pandas/pyarrow versions) reads the same.
    big = pa.table(
        {"image": pa.array([png], pa.binary()), "caption": pa.array([["p", "q"]], pa.list_(pa.large_string()))}
    )
    with pa.OSFile(str(tmp_path / "big.arrow"), "wb") as sink, pa.ipc.new_file(sink, big.schema) as w:
        w.write_table(big)
    both = ArrowCaptionDataset([path, tmp_path / "big.arrow"], T)
    assert [both.caption(i) for i in range(len(both))] == ["a", "b", "c", "p", "q"]
    assert both[4].image_id == "1:0"
    with pytest.raises(AnnotationError, match=r"2 Arrow table\(s\) not found: .*m1\.arrow, .*m2\.arrow"):
        ArrowCaptionDataset([path, tmp_path / "m1.arrow", tmp_path / "m2.arrow"], T)
    (tmp_path / "notarrow.arrow").write_bytes(b"hello")
    with pytest.raises(AnnotationError, match="not an Arrow IPC file"):
        ArrowCaptionDataset([tmp_path / "notarrow.arrow"], T)
