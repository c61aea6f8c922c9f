"""The data fuzzer (scripts/fuzz_data.py) and one regression test per bug it found in fiber-data.

Every loader and ``verify`` must either succeed or raise :class:`fiber_data.DataError` naming the file (and
the record); the regression tests below feed each bug's minimal input and check the error and its location.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import struct
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fiber_data import (
    AnnotationError,
    ArrowCaptionDataset,
    CocoCaptionsDataset,
    DataError,
    DetectionGroundingDataset,
    GroundingTransform,
    ImageLoadError,
    ImageTransform,
    KarpathyCaptionsDataset,
    MdetrGroundingDataset,
    NLVR2Dataset,
    TarImageTextDataset,
    TSVDetectionDataset,
    load_image,
    load_image_bytes,
    verify_annotations,
    write_caption_table,
    write_tar_shards,
)
from fiber_data.formats.tsv import write_tsv
from fiber_data.io import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
T = ImageTransform(16)
TB = GroundingTransform((16,), 32, 0.0, train=False)


def _load_fuzzer() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_data", ROOT / "scripts" / "fuzz_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_data"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz() -> Any:
    return _load_fuzzer()


def _png(size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(size * size * 3) % 251).astype(np.uint8).reshape(size, size, 3)).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------------------------------- the fuzzer


def test_fuzzer_300_mutated_inputs_break_no_loader(fuzz: Any, tmp_path: Path) -> None:
    report = fuzz.run_fuzz(300, seed=12, workdir=tmp_path)
    assert report.iterations == 300
    assert not report.failures, report.summary()
    # every target was exercised and both outcomes occur: mutations that are rejected and benign ones
    assert len(report.per_target) == 20
    assert report.outcomes["data-error"] > 50 and report.outcomes["ok"] > 20
    assert report.outcomes["verify-errors"] > 30


def test_fuzzer_reports_a_planted_bug_with_its_location(
    fuzz: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fiber_data.sources.nlvr2 as nlvr2

    def broken(identifier: str) -> str:
        return {"train": "x"}[identifier]  # KeyError for every real identifier

    monkeypatch.setattr(nlvr2, "pair_identifier", broken)
    report = fuzz.run_fuzz(20, seed=0, workdir=tmp_path, targets=["load:nlvr2"])
    assert report.failures, "the fuzzer missed an uncaught KeyError"
    sigs = list(report.unique_failures)
    assert any("KeyError at nlvr2.py" in s for s in sigs), sigs  # the last fiber_data frame
    assert all(f.target == "load:nlvr2" for f in report.failures)


def test_fuzzer_demo_target_finds_a_request_parser_that_answers_500(
    fuzz: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fiber_train.demo.server as server

    monkeypatch.setattr(server, "parse_request_json", json.loads)  # the parser before issue 21: 500 on deep JSON
    report = fuzz.run_fuzz(60, seed=0, workdir=tmp_path, targets=["demo:request"])
    assert report.failures, "the fuzzer missed HTTP 500 answers"
    assert all(f.target == "demo:request" and "answered 'HTTP/1.1 500" in f.error for f in report.failures)
    monkeypatch.undo()
    clean = fuzz.run_fuzz(60, seed=0, workdir=tmp_path / "again", targets=["demo:request", "load:detection-boxes"])
    assert not clean.failures, clean.summary()


def test_fuzzer_command_line_writes_a_json_report(fuzz: Any, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    rc = fuzz.main(["--iterations", "12", "--seed", "3", "--target", "verify", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert rc == 0 and payload["iterations"] == 12 and payload["failures"] == []
    assert set(payload["per_target"]) <= {
        f"verify:{f}"
        for f in ("coco-captions", "coco-detection", "grounding", "karpathy", "nlvr2", "vqa-questions", "image")
    }


# -------------------------------------------------------------------------- regressions: JSON and text


def test_deeply_nested_json_is_an_annotation_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match=r"deep\.json: JSON nested too deeply"):
        read_json(deep)
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"a": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(AnnotationError, match=r"deep\.jsonl: record line 2: JSON nested too deeply"):
        read_jsonl(lines)
    report = verify_annotations("nlvr2", lines, tmp_path, check_images=False)
    assert [str(e.record) for e in report.errors][:1] == ["line 2"]


def test_integer_literal_beyond_python_digit_limit_is_an_annotation_error(tmp_path: Path) -> None:
    big = "9" * 5000  # json.loads raises a bare ValueError (int_max_str_digits), not JSONDecodeError
    f = _write(tmp_path / "c.json", {})
    f.write_text('{"images": [{"id": ' + big + ', "file_name": "a.png"}], "annotations": []}')
    with pytest.raises(AnnotationError, match=r"c\.json: invalid JSON \(Exceeds the limit"):
        CocoCaptionsDataset(f, tmp_path, T)
    lines = tmp_path / "n.jsonl"
    lines.write_text('{"identifier": "a-b-c-0", "sentence": "s", "n": ' + big + "}\n")
    with pytest.raises(AnnotationError, match=r"n\.jsonl: record line 1: invalid JSON"):
        NLVR2Dataset(lines, tmp_path, T)
    report = verify_annotations("nlvr2", lines, tmp_path, check_images=False)
    assert [e.record for e in report.errors] == ["line 1"]


def test_jsonl_with_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "train.json"
    f.write_bytes(b'{"identifier": "train-1-0-0", "sentence": "ok", "label": "True"}\n{"sentence": "\xff\xfe"}\n')
    with pytest.raises(AnnotationError, match=r"train\.json: record line 2: not UTF-8"):
        NLVR2Dataset(f, tmp_path, T)
    report = verify_annotations("nlvr2", f, tmp_path, check_images=False)
    assert any(e.record == "line 2" and "not UTF-8" in e.message for e in report.errors)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", 10**30, r"record images\[0\]: field 'id' = a 31-digit integer does not fit in 64 bits"),
        ("image_id", -(2**63) - 1, r"record annotations\[0\]: field 'image_id' = .* does not fit in 64 bits"),
        ("caption", "bad \ud800 surrogate", r"record annotations\[0\]: field 'caption' is not valid Unicode"),
    ],
)
def test_coco_values_that_json_accepts_but_no_loader_can_use(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    data = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    (data["images"][0] if field == "id" else data["annotations"][0])[field] = value
    if field == "id":
        data["annotations"][0]["image_id"] = value
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(data))  # json writes the lone surrogate as the escape \ud800
    with pytest.raises(AnnotationError, match=r"captions\.json: " + message):
        CocoCaptionsDataset(ann, tmp_path, T)


def test_karpathy_cocoid_beyond_int64(tmp_path: Path) -> None:
    ann = _write(
        tmp_path / "k.json",
        {"images": [{"split": "test", "filename": "a.png", "cocoid": 2**64, "sentences": [{"raw": "x"}]}]},
    )
    with pytest.raises(AnnotationError, match=r"record images\[0\]: field 'cocoid' = .* does not fit in 64 bits"):
        KarpathyCaptionsDataset(ann, tmp_path, T, splits=("test",))


def _grounding(caption: str, spans: Any, category: Any = 1) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 12, "height": 12, "caption": caption}],
        "annotations": [{"image_id": 1, "bbox": [1, 1, 5, 5], "tokens_positive": spans, "category_id": category}],
    }


@pytest.mark.parametrize(
    ("spans", "category", "message"),
    [
        ([[5, 2]], 1, r"tokens_positive span \[5, 2\] is outside the caption \(length 7\)"),
        ([[0, 10**9]], 1, r"tokens_positive span \[0, 1000000000\] is outside the caption"),
        ([[-3, 2]], 1, r"tokens_positive span \[-3, 2\] is outside the caption"),
        ([[0, 3]], 10**30, r"field 'category_id' = a 31-digit integer does not fit in 64 bits"),
        ([[0, 3]], "dog", r"field 'category_id' should be int"),
    ],
)
def test_grounding_bad_spans_and_categories_name_the_annotation(
    tmp_path: Path, spans: Any, category: Any, message: str
) -> None:
    ann = _write(tmp_path / "g.json", _grounding("a red x", spans, category))
    with pytest.raises(AnnotationError, match=r"g\.json: record annotations\[0\]: " + message):
        MdetrGroundingDataset(ann, tmp_path, TB)


def test_detection_bbox_of_strings_names_the_annotation(tmp_path: Path) -> None:
    ann = _write(
        tmp_path / "det.json",
        {
            "categories": [{"id": 1, "name": "x"}],
            "images": [{"id": 1, "file_name": "a.png", "width": 12, "height": 12}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": ["a", "b", "c", "d"]}],
        },
    )
    with pytest.raises(AnnotationError, match=r"det\.json: record annotations\[0\]: bbox should be"):
        DetectionGroundingDataset(ann, tmp_path, TB)


def test_verify_survives_a_width_too_large_for_float(tmp_path: Path) -> None:
    ann = _write(
        tmp_path / "det.json",
        {
            "categories": [{"id": 1, "name": "x"}],
            "images": [{"id": 1, "file_name": "a.png", "width": 10**400, "height": 5}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
        },
    )
    report = verify_annotations("coco-detection", ann, tmp_path, check_images=False)
    assert report.num_records == 3 and report.errors == []


# ------------------------------------------------------------------------------------- regressions: images


@pytest.mark.parametrize("error", [SyntaxError("broken PNG file"), EOFError(), struct.error("unpack"), IndexError()])
def test_pil_plugin_errors_become_image_load_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png())

    def fail(self: Image.Image) -> None:
        raise error

    monkeypatch.setattr(Image.Image, "load", fail)
    with pytest.raises(ImageLoadError, match=rf"a\.png: record r7: cannot decode image \({type(error).__name__}"):
        load_image(path, record="r7")
    with pytest.raises(ImageLoadError, match=rf"s\.tar: record k: cannot decode image bytes \({type(error).__name__}"):
        load_image_bytes(path.read_bytes(), source="s.tar", record="k")


def test_image_name_too_long_is_an_image_load_error(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"record images\[3\]: bad image path \(File name too long\)"):
        load_image(tmp_path / ("x" * 5000 + ".png"), record="images[3]")


# -------------------------------------------------------------------------------------- regressions: Arrow


def test_arrow_file_with_corrupt_offsets_is_refused_not_a_segfault(tmp_path: Path) -> None:
    path = write_caption_table(tmp_path / "t.arrow", [_png()] * 3, [["a", "b"]] * 3, ["x", "y", "z"], "train")
    data = bytearray(path.read_bytes())
    offsets = struct.pack("<4i", 0, 2, 4, 6)  # the caption list column's offsets buffer
    at = data.find(offsets)
    assert at > 0
    data[at : at + 16] = struct.pack("<4i", 0, 2, 1 << 28, 6)
    path.write_bytes(bytes(data))
    with pytest.raises(AnnotationError, match=r"t\.arrow: not an Arrow IPC file, or a corrupt one"):
        ArrowCaptionDataset([path], T)


def test_arrow_columns_of_the_wrong_type_or_null(tmp_path: Path) -> None:
    import pyarrow as pa

    def table(**cols: Any) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.arrow"
        t = pa.table(cols)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
        return path

    png = _png()
    bad_caption = table(image=pa.array([png], pa.binary()), caption=pa.array([[1, 2]]))
    with pytest.raises(AnnotationError, match=r"column 'caption' should be list<string>, got list<item: int64>"):
        ArrowCaptionDataset([bad_caption], T)
    bad_image = table(image=pa.array(["not bytes"]), caption=pa.array([["a"]]))
    with pytest.raises(AnnotationError, match=r"column 'image' should be binary, got string"):
        ArrowCaptionDataset([bad_image], T)
    null_caption = table(image=pa.array([png], pa.binary()), caption=pa.array([["a", None]], pa.list_(pa.string())))
    with pytest.raises(AnnotationError, match=r"record row 0: caption 1 is null"):
        ArrowCaptionDataset([null_caption], T)
    null_image = table(image=pa.array([None], pa.binary()), caption=pa.array([["a"]]))
    with pytest.raises(ImageLoadError, match=r"record row 0: image is null"):
        ArrowCaptionDataset([null_image], T)[0]


# ---------------------------------------------------------------------------------------- regressions: tar


def test_tar_caption_that_is_not_utf8_names_the_sample(tmp_path: Path) -> None:
    [shard] = write_tar_shards(
        [{"__key__": "000007", "png": _png(), "txt": b"\xff\xfe bad"}], str(tmp_path / "s-%d.tar")
    )
    with pytest.raises(DataError, match=r"s-0\.tar: record 000007: caption is not UTF-8 text"):
        list(TarImageTextDataset([str(shard)], T))


def test_corrupt_gzip_shard_is_a_data_error(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("000000.txt")
        payload = bytes(range(256)) * 64
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data[: len(data) - 20]))
    with pytest.raises(DataError, match=r"s\.tar\.gz: unreadable tar shard"):
        list(TarImageTextDataset([str(shard)], T))


# ---------------------------------------------------------------------------------------- regressions: TSV


@pytest.fixture
def tsv_bundle(tmp_path: Path) -> dict[str, Path]:
    png = base64.b64encode(_png()).decode()
    rows = [("k0", png), ("k1", png)]
    labels = [("k0", json.dumps([{"class": "dog", "rect": [1, 1, 8, 8]}])), ("k1", "[]")]
    return {
        "images": write_tsv(tmp_path / "images.tsv", rows),
        "labels": write_tsv(tmp_path / "labels.tsv", labels),
        "hw": write_tsv(tmp_path / "hw.tsv", [("k0", '[{"height": 12, "width": 12}]'), ("k1", "[]")]),
        "labelmap": _write(tmp_path / "labelmap.json", {"dog": 1}),
    }


def _tsv(b: dict[str, Path], **kw: Any) -> TSVDetectionDataset:
    return TSVDetectionDataset(b["images"], b["labels"], b["labelmap"], TB, **kw)


@pytest.mark.parametrize(
    ("lineidx", "message"),
    [
        (b"0\nabc\n", r"labels\.lineidx: record line 2: expected a byte offset, got 'abc'"),
        (b"0\n-5\n", r"labels\.lineidx: record line 2: expected a byte offset, got '-5'"),
        (b"0\n99999\n", r"labels\.lineidx: record line 2: offset 99999 is past the end of the TSV"),
        (b"0\n\xff\n", r"labels\.lineidx: record line 2: not UTF-8 text"),
    ],
)
def test_tsv_bad_line_index(tsv_bundle: dict[str, Path], lineidx: bytes, message: str) -> None:
    tsv_bundle["labels"].with_suffix(".lineidx").write_bytes(lineidx)
    with pytest.raises(AnnotationError, match=message):
        _tsv(tsv_bundle)


@pytest.mark.parametrize("text", ["0\nabc\n", "0\n7\n", f"0\n{2**70}\n"])
def test_tsv_bad_line_list(tsv_bundle: dict[str, Path], tmp_path: Path, text: str) -> None:
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(AnnotationError, match=r"list\.txt: record line 2: expected a line number in \[0, 2\)"):
        _tsv(tsv_bundle, linelist=tmp_path / "list.txt")


def test_tsv_bad_sizes_rects_and_text(tsv_bundle: dict[str, Path]) -> None:
    ds = _tsv(tsv_bundle, hw_tsv=tsv_bundle["hw"])
    assert ds[0].orig_size == (12, 12)
    with pytest.raises(AnnotationError, match=r"hw\.tsv: record line 1: expected \[\{\"height\": h"):
        ds[1]  # '[]' has no size
    write_tsv(tsv_bundle["labels"], [("k0", json.dumps([{"class": "dog", "rect": ["a", 1, 2, 3]}])), ("k1", "{}")])
    ds = _tsv(tsv_bundle)
    with pytest.raises(AnnotationError, match=r"labels\.tsv: record line 0: object 0: needs a known 'class'"):
        ds[0]
    with pytest.raises(AnnotationError, match=r"labels\.tsv: record line 1: expected a JSON list of objects"):
        ds[1]
    raw = tsv_bundle["labels"].read_bytes().replace(b"k0", b"k\xff", 1)
    tsv_bundle["labels"].write_bytes(raw)
    with pytest.raises(AnnotationError, match=r"labels\.tsv: record line 0: not UTF-8 text"):
        ds[0]
    _write(tsv_bundle["labelmap"], {"dog": 2**64})
    with pytest.raises(AnnotationError, match=r"labelmap\.json: record class 'dog': field 'dog' = .* 64 bits"):
        _tsv(tsv_bundle)
