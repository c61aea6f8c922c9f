#!/usr/bin/env python
"""Seeded mutation fuzzer for the ``fiber-data`` loaders and ``fiber-data verify`` (issue 12, reliability).

It builds a tiny, valid corpus (a synthetic world, an Arrow caption table, a WebDataset tar shard and an
Objects365-style TSV bundle), then, for ``--iterations`` rounds, picks a target (a loader or a ``verify``
format), mutates one of its input files and runs the target over every record. The mutations cover what a
broken real dataset looks like: truncated and bit-flipped images, wrong JSON types, missing fields, huge
numbers, NaN/Infinity, bad character spans, duplicate ids, deep nesting, invalid UTF-8, broken Arrow files and
tables with wrong column types, broken tar files and tar members with unsafe paths, bad base64 and line indexes.

Three targets go beyond a plain loader run: ``load:detection-boxes`` replaces boxes and image sizes by hostile
numbers and checks that every box is kept (finite, inside its image) or counted in
``DetectionGroundingDataset.repairs``; ``load:tar-gz`` reads compressed shards, decompression bombs included
(the expansion floor scaled down to 1 MiB); ``demo:request`` posts mutated requests (JSON, embedded images,
``Content-Length``) to a demo server, whose contract is an HTTP 4xx answer with a JSON error, never a 5xx.

Contract checked (docs/reference/data-formats.md, "errors"): a target either succeeds or raises
:class:`fiber_data.errors.DataError` (or a subclass) whose ``file`` names the file at fault;
``verify_annotations`` never raises and every error it collects names its file. Anything else (``KeyError``,
``TypeError``, ``OverflowError``, ``UnicodeDecodeError``, a hang, ...) is a *failure*, reported with the
iteration seed and the mutations so that it can be replayed with ``--only-iteration``.

Usage::

    python scripts/fuzz_data.py --iterations 1000 --seed 0
    python scripts/fuzz_data.py --iterations 1 --seed 0 --only-iteration 417 --verbose   # replay one case

Exit code: 0 when no failure was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import logging
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FuzzFailure", "FuzzReport", "build_corpus", "main", "run_fuzz"]

#: seconds one target run may take before it counts as a hang
HANG_SECONDS = 20.0


@dataclass
class FuzzFailure:
    """One input that broke the contract."""

    iteration: int
    target: str
    mutations: list[str]
    error: str
    where: str
    trace: str

    @property
    def signature(self) -> str:
        """Deduplication key: target kind, exception type and the raising line."""
        return f"{self.target.split(':')[0]} {self.error.split(':')[0]} at {self.where}"


@dataclass
class FuzzReport:
    """Counts of one fuzzing session."""

    iterations: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    per_target: Counter[str] = field(default_factory=Counter)
    failures: list[FuzzFailure] = field(default_factory=list)

    @property
    def unique_failures(self) -> dict[str, FuzzFailure]:
        """First failure of each :attr:`FuzzFailure.signature`."""
        out: dict[str, FuzzFailure] = {}
        for f in self.failures:
            out.setdefault(f.signature, f)
        return out

    def summary(self) -> str:
        lines = [
            f"{self.iterations} mutated inputs in {self.seconds:.1f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            "per target: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_target.items())),
        ]
        uniq = self.unique_failures
        lines.append(f"{len(self.failures)} failures, {len(uniq)} distinct")
        for sig, f in uniq.items():
            lines.append(f"  [{f.iteration}] {sig}\n      {f.error[:300]}\n      mutations: {f.mutations}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Paths of the valid seed inputs."""

    root: Path
    world: Path
    files: dict[str, Path]


def build_corpus(root: Path) -> Corpus:
    """Write the valid seed inputs under ``root`` (a tiny synthetic world plus Arrow, tar and TSV files)."""
    from fiber_data import SyntheticWorldConfig, generate_world, write_caption_table, write_tar_shards
    from fiber_data.formats.tsv import write_tsv

    world = generate_world(
        root / "world",
        SyntheticWorldConfig(
            seed=0,
            image_size=24,
            num_train=3,
            num_val=1,
            num_test=1,
            captions_per_image=2,
            max_objects=2,
            tokenizer_vocab_size=300,
            vqa_questions_per_image=2,
            nlvr2_statements_per_pair=3,
        ),
        progress=False,
    )
    ann = world / "annotations"
    coco = json.loads((ann / "captions_train.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    blobs, captions, names = [], [], []
    for im in coco["images"]:
        blobs.append((world / "images" / "train" / im["file_name"]).read_bytes())
        captions.append(by_image.get(im["id"], []))
        names.append(im["file_name"])
    files = {
        "coco-captions": ann / "captions_train.json",
        "karpathy": ann / "karpathy.json",
        "grounding": ann / "grounding_train.json",
        "coco-detection": ann / "instances_train.json",
        "vqa-questions": ann / "vqa_questions_train.json",
        "vqa-annotations": ann / "vqa_annotations_train.json",
        "nlvr2": world / "nlvr2" / "train.json",
        "image": world / "images" / "train" / names[0],
    }
    files["arrow"] = write_caption_table(root / "captions.arrow", blobs, captions, names, "train")
    samples = [
        {"__key__": f"{i:06d}", "png": b, "txt": c[0], "json": {"caption": c[-1]}}
        for i, (b, c) in enumerate(zip(blobs, captions))
    ]
    files["tar"] = write_tar_shards(samples, str(root / "shard-%06d.tar"))[0]
    files["tar-gz"] = root / "shard-gz.tar.gz"
    with tarfile.open(files["tar"]) as src, tarfile.open(files["tar-gz"], "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    files["demo-image"] = files["image"]
    files["demo-request"] = root / "request.json"
    files["demo-request"].write_text(
        json.dumps(
            {
                "task": "grounding",
                "text": "[a red circle] left of [a blue square]",
                "image": base64.b64encode(blobs[0]).decode("ascii"),
                "filename": "x.png",
            }
        )
    )
    label_rows, image_rows, hw_rows = [], [], []
    for i, (b, name) in enumerate(zip(blobs, names)):
        objects = [
            {"class": "red circle", "rect": [1.0, 2.0, 20.0, 18.0]},
            {"class": "blue square", "rect": [0, 0, 9, 9]},
        ]
        label_rows.append((name, json.dumps(objects[: 1 + i % 2])))
        image_rows.append((name, base64.b64encode(b).decode("ascii")))
        hw_rows.append((name, json.dumps([{"height": 24, "width": 24}])))
    files["tsv-images"] = write_tsv(root / "tsv" / "images.tsv", image_rows)
    files["tsv-labels"] = write_tsv(root / "tsv" / "labels.tsv", label_rows)
    files["tsv-hw"] = write_tsv(root / "tsv" / "hw.tsv", hw_rows)
    files["tsv-labelmap"] = root / "tsv" / "labelmap.json"
    files["tsv-labelmap"].write_text(json.dumps({"red circle": 1, "blue square": 2}))
    files["tsv-linelist"] = root / "tsv" / "linelist.txt"
    files["tsv-linelist"].write_text("0\n1\n2\n1\n")
    files["tsv-lineidx"] = root / "tsv" / "labels.lineidx"
    return Corpus(root=root, world=world, files=files)


# ------------------------------------------------------------------------------------------- mutations

_EVIL_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    10**30,
    10**400,
    -(10**30),
    2**63,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    0.5,
    "",
    "x",
    "0",
    "12",
    "NaN",
    "../../../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "\ud800",
    "é" * 3,
    "x" * 5000,
    [],
    {},
    [1, 2],
    [[5, 2]],
    [[-3, 10**12]],
    [[0, 10**30]],
    ["a", "b", "c", "d"],
    [1, 2, 3, 4],
    [0, 0, -5, -5],
    [1e308, 1e308, 1e308, 1e308],
    [float("nan")] * 4,
    {"a": 1},
    [[0, 1], "x"],
]


#: fields the loaders read (mutated more often than the rest)
_SCHEMA_KEYS = frozenset(
    (  # noqa: SIM905 - a word list reads better than 33 quoted strings
        "images annotations categories questions id image_id category_id file_name coco_url caption bbox "
        "tokens_positive width height iscrowd data_source dataset_name name question_id question answers answer "
        "data_subtype split filename filepath cocoid sentences raw identifier sentence label directory"
    ).split()
)


def _nodes(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """Every (path, container) pair of a JSON document, the root included."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    if isinstance(obj, dict):
        out.append((path, obj))
        for k, v in obj.items():
            out.extend(_nodes(v, (*path, k)))
    elif isinstance(obj, list):
        out.append((path, obj))
        for i, v in enumerate(obj):
            out.extend(_nodes(v, (*path, i)))
    return out


def _fmt(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "<root>"


def _evil(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(_EVIL_VALUES))


def mutate_json_structure(doc: Any, rng: random.Random, log: list[str]) -> Any:
    """Apply one structural mutation to a parsed JSON document (in place where possible); returns the doc."""
    containers = _nodes(doc)
    op = rng.choice(
        ["delete", "replace", "replace", "field", "field", "field", "duplicate", "swap", "retype", "span", "root"]
    )
    if op == "field":
        hits = [(p, c, k) for p, c in containers if isinstance(c, dict) for k in c if k in _SCHEMA_KEYS]
        if hits:
            # choose the field name first, so that rare fields (an image's width) are hit as often as common ones
            name = rng.choice(sorted({k for _, _, k in hits}))
            path, rec, key = rng.choice([h for h in hits if h[2] == name])
            if rng.random() < 0.25:
                del rec[key]
                log.append(f"del {_fmt((*path, key))}")
            else:
                rec[key] = _evil(rng)
                log.append(f"{_fmt((*path, key))} := {rec[key]!r:.60}")
            return doc
        op = "replace"
    if op == "root":
        log.append("root := evil value")
        return _evil(rng)
    if op == "span":
        spans = [(p, c) for p, c in containers if isinstance(c, dict) and "tokens_positive" in c]
        if spans:
            path, rec = rng.choice(spans)
            bad = rng.choice([[[5, 2]], [[-4, 3]], [[0, 10**9]], [[3]], [[1, 2, 3]], [["a", "b"]], [[0, 1e308]], 7])
            rec["tokens_positive"] = bad
            log.append(f"{_fmt(path)}['tokens_positive'] := {bad!r}")
            return doc
        op = "replace"
    dicts = [(p, c) for p, c in containers if isinstance(c, dict) and c]
    lists = [(p, c) for p, c in containers if isinstance(c, list) and c]
    if op in ("duplicate", "swap") and lists:
        path, lst = rng.choice(lists)
        i = rng.randrange(len(lst))
        if op == "duplicate":
            lst.insert(rng.randrange(len(lst) + 1), copy.deepcopy(lst[i]))
            log.append(f"{_fmt(path)}: duplicate element {i}")
        else:
            j = rng.randrange(len(lst))
            lst[i], lst[j] = lst[j], lst[i]
            lst[i] = _evil(rng) if rng.random() < 0.5 else lst[i]
            log.append(f"{_fmt(path)}: swap {i} and {j}")
        return doc
    if not dicts:
        log.append("root := evil value (no object)")
        return _evil(rng)
    path, rec = rng.choice(dicts)
    key = rng.choice(list(rec))
    if op == "delete":
        del rec[key]
        log.append(f"del {_fmt((*path, key))}")
    elif op == "retype":
        value = rec[key]
        new: Any = (
            str(value)
            if not isinstance(value, str)
            else (int(value) if value.isdigit() else [value] if rng.random() < 0.5 else {"v": value})
        )
        rec[key] = new
        log.append(f"{_fmt((*path, key))} := {new!r:.60}")
    else:
        rec[key] = _evil(rng)
        log.append(f"{_fmt((*path, key))} := {rec[key]!r:.60}")
    return doc


def mutate_bytes(data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """One byte-level mutation: truncate, flip bytes, overwrite, insert, duplicate a chunk or empty the file."""
    op = rng.choice(["truncate", "truncate", "flip", "flip", "zero", "insert", "dup", "empty"])
    n = len(data)
    if op == "empty" or n == 0:
        log.append("empty file")
        return b""
    if op == "truncate":
        cut = rng.randrange(n)
        log.append(f"truncate at {cut}/{n}")
        return data[:cut]
    buf = bytearray(data)
    if op == "flip":
        k = rng.randint(1, 8)
        for _ in range(k):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        log.append(f"flip {k} bits")
    elif op == "zero":
        i = rng.randrange(n)
        ln = rng.randint(1, 64)
        buf[i : i + ln] = bytes(len(buf[i : i + ln]))
        log.append(f"zero {ln} bytes at {i}")
    elif op == "insert":
        i = rng.randrange(n)
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        buf[i:i] = junk
        log.append(f"insert {len(junk)} random bytes at {i}")
    else:
        i = rng.randrange(n)
        chunk = buf[i : i + rng.randint(1, 256)]
        buf[i:i] = chunk
        log.append(f"duplicate {len(chunk)} bytes at {i}")
    return bytes(buf)


def mutate_json_text(data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """A mutation of a JSON file's text: bytes, invalid UTF-8, deep nesting, literals, or structure."""
    op = rng.choice(["structure", "structure", "structure", "structure", "bytes", "utf8", "deep", "literal"])
    if op == "bytes":
        return mutate_bytes(data, rng, log)
    if op == "utf8":
        i = rng.randrange(max(1, len(data)))
        log.append(f"invalid UTF-8 at {i}")
        return data[:i] + b"\xff\xfe\xc3" + data[i:]
    if op == "deep":
        depth = rng.choice([1000, 100_000])
        log.append(f"nested {depth} deep")
        return b"[" * depth + b"]" * depth
    if op == "literal":
        text = data.decode("utf-8")
        lit = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "123456789012345678901234567890", "7" * 5000])
        # replace the first integer value after a ':' by the literal
        idx = text.find(":", rng.randrange(max(1, len(text))))
        if idx >= 0:
            end = idx + 1
            while end < len(text) and text[end] not in ",}]":
                end += 1
            log.append(f"value at char {idx} := {lit[:40]}")
            return (text[: idx + 1] + lit + text[end:]).encode()
        return data
    doc = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        doc = mutate_json_structure(doc, rng, log)
    return json.dumps(doc).encode("utf-8", "surrogatepass")


def mutate_jsonl_text(data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """Mutate one line of a JSON Lines file (structure or text), or the whole file's bytes."""
    lines = data.split(b"\n")
    idx = [i for i, ln in enumerate(lines) if ln.strip()]
    if rng.random() < 0.2 or not idx:
        return mutate_bytes(data, rng, log)
    i = rng.choice(idx)
    sub: list[str] = []
    lines[i] = mutate_json_text(lines[i], rng, sub).replace(b"\n", b" ")
    log.extend(f"line {i + 1}: {m}" for m in sub)
    return b"\n".join(lines)


def mutate_tar(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """Byte mutations of a tar shard, or a rebuilt shard with hostile members (unsafe names, links, sizes)."""
    if rng.random() < 0.5:
        return mutate_bytes(data, rng, log)
    with tarfile.open(fileobj=io.BytesIO(data)) as src:
        # a regular file always extracts (extractfile gives None only for other member types)
        members = [(m, f.read()) for m in src.getmembers() if m.isfile() and (f := src.extractfile(m)) is not None]
    out = io.BytesIO()
    op = rng.choice(["unsafe-name", "absolute", "symlink", "hardlink", "dir", "no-image", "no-text", "gzip", "dev"])
    log.append(f"tar: {op}")
    mode = "w:gz" if op == "gzip" else "w"
    with tarfile.open(fileobj=out, mode=mode) as dst:
        for k, (m, payload) in enumerate(members):
            info = copy.copy(m)
            if op == "unsafe-name" and k == 1:
                info.name = "../../escape/" + m.name
            elif op == "absolute" and k == 1:
                info.name = "/tmp/fiber-fuzz-escape/" + m.name
            elif (
                op == "no-image"
                and m.name.endswith(".png")
                or op == "no-text"
                and (m.name.endswith(".txt") or m.name.endswith(".json"))
            ):
                continue
            dst.addfile(info, io.BytesIO(payload))
        if op in ("symlink", "hardlink", "dir", "dev"):
            extra = tarfile.TarInfo("000000.jpg" if op != "dir" else "000000.d")
            extra.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "dir": tarfile.DIRTYPE,
                "dev": tarfile.CHRTYPE,
            }[op]
            extra.linkname = "/etc/passwd"
            dst.addfile(extra)
    if op == "gzip" and rng.random() < 0.5:
        return mutate_bytes(out.getvalue(), rng, log)
    return out.getvalue()


def mutate_tar_gz(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """A ``.tar.gz`` shard: the tar mutations (re-compressed), a decompression bomb, or byte mutations."""
    import gzip

    op = rng.choice(["tar", "tar", "bomb", "bytes"])
    if op == "bytes":
        return mutate_bytes(data, rng, log)
    if op == "bomb":  # many members of zeros: each small, together thousands of times the file size
        n, size = rng.choice([(64, 65536), (8, 1 << 20), (1, 4 << 20)])
        log.append(f"tar.gz bomb: {n} members of {size} zero bytes")
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as dst:
            for k in range(n):
                info = tarfile.TarInfo(f"{k:06d}.txt")
                info.size = size
                dst.addfile(info, io.BytesIO(bytes(size)))
        return out.getvalue()
    raw = mutate_tar(path, gzip.decompress(data), rng, log)
    return raw if raw[:2] == b"\x1f\x8b" else gzip.compress(raw)


def mutate_boxes(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """COCO detection boxes and image sizes replaced by hostile numbers (NaN, inf, negative, outside, huge)."""
    doc = json.loads(data)
    values = [float("nan"), float("inf"), -float("inf"), -5.0, 0.0, 0.4, 1e9, 1e308, 23.9, 24.0, 30.0, -1e308]
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.8 and doc["annotations"]:
            j = rng.randrange(len(doc["annotations"]))
            k = rng.randrange(4)
            v = rng.choice(values)
            doc["annotations"][j]["bbox"][k] = v
            log.append(f"annotations[{j}].bbox[{k}] := {v}")
        else:
            i = rng.randrange(len(doc["images"]))
            key = rng.choice(["width", "height"])
            v = rng.choice([1, 2, 5, 10**6])
            doc["images"][i][key] = v
            log.append(f"images[{i}].{key} := {v}")
    return json.dumps(doc).encode()


def mutate_arrow(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """Byte mutations of an Arrow IPC file, or a valid file whose columns have the wrong types/values."""
    if rng.random() < 0.5:
        return mutate_bytes(data, rng, log)
    import pyarrow as pa
    import pyarrow.ipc

    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    op = rng.choice(["caption-int", "caption-str", "caption-null", "image-str", "image-null", "drop", "id-int"])
    log.append(f"arrow: {op}")
    arrays: dict[str, Any] = {name: pa.array(v) for name, v in cols.items()}
    if op == "caption-int":
        arrays["caption"] = pa.array([[1, 2]] * n)
    elif op == "caption-str":
        arrays["caption"] = pa.array(["a caption"] * n)
    elif op == "caption-null":
        arrays["caption"] = pa.array([None, *[["x", None]] * (n - 1)], type=pa.list_(pa.string()))
    elif op == "image-str":
        arrays["image"] = pa.array(["not bytes"] * n)
    elif op == "image-null":
        arrays["image"] = pa.array([None] * n, type=pa.binary())
    elif op == "id-int":
        arrays["image_id"] = pa.array(list(range(n)))
    else:
        arrays.pop(rng.choice(list(arrays)))
    new = pa.table(arrays)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, new.schema) as writer:
        writer.write_table(new)
    return sink.getvalue()


def mutate_tsv(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """Line-level mutations of a TSV file (no tab, bad base64/JSON, wrong key) or byte mutations."""
    lines = data.split(b"\n")
    idx = [i for i, ln in enumerate(lines) if ln]
    if rng.random() < 0.3 or not idx:
        return mutate_bytes(data, rng, log)
    i = rng.choice(idx)
    key, _, value = lines[i].partition(b"\t")
    op = rng.choice(["no-tab", "bad-value", "key", "json-structure", "utf8"])
    log.append(f"tsv line {i}: {op}")
    if op == "no-tab":
        lines[i] = key + b" " + value
    elif op == "bad-value":
        lines[i] = key + b"\t" + rng.choice([b"", b"!!!!", b"[", b"null", b"{}", b"[1]", b"QUJD"])
    elif op == "key":
        lines[i] = b"other\t" + value
    elif op == "utf8":
        lines[i] = key + b"\xff\t" + value
    else:
        try:
            doc = json.loads(value)
        except ValueError:
            return mutate_bytes(data, rng, log)
        sub: list[str] = []
        doc = mutate_json_structure(doc, rng, sub)
        log.extend(sub)
        lines[i] = key + b"\t" + json.dumps(doc).encode()
    return b"\n".join(lines)


def mutate_lines_of_numbers(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """Mutations of a line index / line list: negative, huge, non-numeric, missing or extra lines."""
    lines = data.decode().split("\n")
    op = rng.choice(["negative", "huge", "text", "drop", "extra", "float", "bytes"])
    log.append(f"numbers: {op}")
    i = rng.randrange(max(1, len(lines) - 1))
    if op == "bytes":
        return mutate_bytes(data, rng, log)
    if op == "negative":
        lines[i] = "-5"
    elif op == "huge":
        lines[i] = str(rng.choice([10**6, 2**62, 10**30]))
    elif op == "text":
        lines[i] = "abc"
    elif op == "float":
        lines[i] = "1.5"
    elif op == "drop":
        del lines[i]
    else:
        lines.insert(i, "7")
    return "\n".join(lines).encode()


# --------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A loader (or verify) run over mutated copies of some of its input files."""

    name: str
    roles: list[str]  # corpus files that may be mutated (one per iteration)
    mutators: dict[str, Callable[[Path, bytes, random.Random, list[str]], bytes]]
    run: Callable[[dict[str, Path], Corpus], Any]
    verify: bool = False
    demo: bool = False  # the contract is the demo server's: an HTTP 4xx answer with a JSON error, never a 5xx


def _json_mut(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    return mutate_json_text(data, rng, log)


def _jsonl_mut(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    return mutate_jsonl_text(data, rng, log)


def _bytes_mut(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    return mutate_bytes(data, rng, log)


def _exhaust(ds: Any, collate: Callable[[list[Any]], Any] | None = None) -> int:
    n = 0
    for i in range(len(ds)):
        sample = ds[i]
        if collate is not None:
            collate([sample])
        n += 1
    return n


def _targets(corpus: Corpus) -> list[Target]:
    from fiber_data import (
        ArrowCaptionDataset,
        ByteBPETokenizer,
        CocoCaptionsDataset,
        DetectionGroundingDataset,
        GroundingCollator,
        GroundingTransform,
        ImageTransform,
        KarpathyCaptionsDataset,
        MdetrGroundingDataset,
        NLVR2Dataset,
        TarImageTextDataset,
        TSVDetectionDataset,
        VQAv2Dataset,
        build_answer_vocab,
        load_image,
    )
    from fiber_data.synthetic.config import SYNTHETIC_VQA_TEMPLATE

    w = corpus.world
    t_img = ImageTransform(16)
    t_box = GroundingTransform((16,), 32, 0.0, train=False)
    tok = ByteBPETokenizer.load(w / "tokenizer.json")
    collate = GroundingCollator(tok, max_length=64)
    vocab = build_answer_vocab([corpus.files["vqa-annotations"]], min_count=1)

    def coco(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(CocoCaptionsDataset(f["coco-captions"], w / "images" / "train", t_img))

    def karpathy(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(KarpathyCaptionsDataset(f["karpathy"], w / "images", t_img, splits=("train", "val", "test")))

    def grounding(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(MdetrGroundingDataset(f["grounding"], w / "images" / "train", t_box), collate)

    def detection(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(DetectionGroundingDataset(f["coco-detection"], w / "images" / "train", t_box), collate)

    def vqa(f: dict[str, Path], c: Corpus) -> int:
        ds = VQAv2Dataset(
            f["vqa-questions"],
            f["vqa-annotations"],
            w / "images" / "train",
            t_img,
            vocab,
            image_template=SYNTHETIC_VQA_TEMPLATE,
        )
        return _exhaust(ds)

    def nlvr2(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(NLVR2Dataset(f["nlvr2"], w / "nlvr2" / "images" / "train", t_img))

    def arrow(f: dict[str, Path], c: Corpus) -> int:
        return _exhaust(ArrowCaptionDataset([f["arrow"]], t_img))

    def tar(f: dict[str, Path], c: Corpus) -> int:
        return sum(1 for _ in TarImageTextDataset([str(f["tar"])], t_img))

    def tsv(f: dict[str, Path], c: Corpus) -> int:
        ds = TSVDetectionDataset(
            f["tsv-images"],
            f["tsv-labels"],
            f["tsv-labelmap"],
            t_box,
            hw_tsv=f["tsv-hw"],
            linelist=f["tsv-linelist"],
        )
        return _exhaust(ds, collate)

    def detection_boxes(f: dict[str, Path], c: Corpus) -> int:
        """Every box of the file is kept (finite, inside its image) or counted as repaired/dropped."""
        import numpy as np

        ds = DetectionGroundingDataset(f["coco-detection"], w / "images" / "train", t_box)
        doc = json.loads(f["coco-detection"].read_text())
        size = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        total = sum(1 for a in doc["annotations"] if not a.get("iscrowd", 0))
        r = ds.repairs
        removed_images = len(doc["images"]) - len(ds)
        if removed_images != r["images_without_valid_boxes_removed"]:
            raise AssertionError(f"{removed_images} images removed, {r['images_without_valid_boxes_removed']} counted")
        dropped = r["boxes_degenerate_dropped"] + r["boxes_nonfinite_dropped"]
        kept_in_removed = total - dropped - len(ds.labels)  # valid boxes cannot be in removed images
        if kept_in_removed != 0:
            raise AssertionError(f"{total} boxes, {len(ds.labels)} kept, {dropped} counted as dropped")
        if not np.isfinite(ds.boxes).all():
            raise AssertionError("a kept box is not finite")
        for i in range(len(ds)):
            wi, hi = size[int(ds.image_ids[i])]
            b = ds.boxes[int(ds.offsets[i]) : int(ds.offsets[i + 1])]
            if len(b) and (b.min() < 0 or b[:, 2].max() > wi - 1 or b[:, 3].max() > hi - 1):
                raise AssertionError(f"a kept box of image {i} lies outside its {wi}x{hi} image")
        return _exhaust(ds, collate)

    def tar_gz(f: dict[str, Path], c: Corpus) -> int:
        import fiber_data.formats.tar as wds

        floor = wds.MIN_SHARD_LIMIT_BYTES
        wds.MIN_SHARD_LIMIT_BYTES = 1 << 20  # the real floor is 256 MiB: scale the expansion limit down
        try:
            return sum(1 for _ in TarImageTextDataset([str(f["tar-gz"])], t_img))
        finally:
            wds.MIN_SHARD_LIMIT_BYTES = floor

    def image(f: dict[str, Path], c: Corpus) -> int:
        load_image(f["image"], record="fuzz")
        folder = f["image"].parent
        ann = folder / "captions.json"
        ann.write_text(
            json.dumps(
                {"images": [{"id": 1, "file_name": f["image"].name}], "annotations": [{"image_id": 1, "caption": "x"}]}
            )
        )
        return _exhaust(CocoCaptionsDataset(ann, folder, t_img))

    targets = [
        Target("load:coco-captions", ["coco-captions"], {"coco-captions": _json_mut}, coco),
        Target("load:karpathy", ["karpathy"], {"karpathy": _json_mut}, karpathy),
        Target("load:grounding", ["grounding"], {"grounding": _json_mut}, grounding),
        Target("load:coco-detection", ["coco-detection"], {"coco-detection": _json_mut}, detection),
        Target(
            "load:vqa",
            ["vqa-questions", "vqa-annotations"],
            {"vqa-questions": _json_mut, "vqa-annotations": _json_mut},
            vqa,
        ),
        Target("load:nlvr2", ["nlvr2"], {"nlvr2": _jsonl_mut}, nlvr2),
        Target("load:arrow", ["arrow"], {"arrow": mutate_arrow}, arrow),
        Target("load:tar", ["tar"], {"tar": mutate_tar}, tar),
        Target(
            "load:tsv",
            ["tsv-images", "tsv-labels", "tsv-hw", "tsv-labelmap", "tsv-linelist", "tsv-lineidx"],
            {
                "tsv-images": mutate_tsv,
                "tsv-labels": mutate_tsv,
                "tsv-hw": mutate_tsv,
                "tsv-labelmap": _json_mut,
                "tsv-linelist": mutate_lines_of_numbers,
                "tsv-lineidx": mutate_lines_of_numbers,
            },
            tsv,
        ),
        Target("load:image", ["image"], {"image": _bytes_mut}, image),
        Target("load:detection-boxes", ["coco-detection"], {"coco-detection": mutate_boxes}, detection_boxes),
        Target("load:tar-gz", ["tar-gz"], {"tar-gz": mutate_tar_gz}, tar_gz),
        Target(
            "demo:request",
            ["demo-request", "demo-image"],
            {"demo-request": mutate_demo_request, "demo-image": _bytes_mut},
            _demo_request,
            demo=True,
        ),
    ]
    verify_roots = {
        "coco-captions": w / "images" / "train",
        "coco-detection": w / "images" / "train",
        "grounding": w / "images" / "train",
        "karpathy": w / "images",
        "nlvr2": w / "nlvr2" / "images" / "train",
        "vqa-questions": w / "images" / "train",
    }
    for fmt, root in verify_roots.items():
        targets.append(
            Target(
                f"verify:{fmt}",
                [fmt],
                {fmt: _jsonl_mut if fmt == "nlvr2" else _json_mut},
                _make_verify(fmt, root),
                verify=True,
            )
        )
    # verify with a mutated image among the valid annotations
    targets.append(
        Target(
            "verify:image",
            ["image"],
            {"image": _bytes_mut},
            _make_verify_image(),
            verify=True,
        )
    )
    return targets


def mutate_demo_request(path: Path, data: bytes, rng: random.Random, log: list[str]) -> bytes:
    """The demo's request body: JSON mutations (types, nesting, huge numbers, bad UTF-8) or raw bytes; the
    HTTP header is chosen in :func:`_demo_request` (``Content-Length`` right, negative, too large, garbage)."""
    return mutate_json_text(data, rng, log) if rng.random() < 0.8 else mutate_bytes(data, rng, log)


_DEMO: dict[str, Any] = {}


def _demo_server() -> Any:
    """One demo server for the session (every task unavailable: requests are parsed and images decoded, then
    refused with 409), on a free loopback port."""
    if "server" not in _DEMO:
        from fiber_train.demo.backends import TASK_ORDER, BackendSet, UnavailableBackend
        from fiber_train.demo.server import create_server

        backends = BackendSet({t: UnavailableBackend(t, "fuzzing", text_required=t != "caption") for t in TASK_ORDER})
        server = create_server(backends, port=0, max_upload_mb=0.5, max_pixels=2_000_000)
        server.start_background()
        _DEMO["server"] = server
    return _DEMO["server"]


def _demo_request(f: dict[str, Path], c: Corpus) -> int:
    """POST the (mutated) request, with a mutated image inside it when that role was picked."""
    import hashlib
    import socket

    body = f["demo-request"].read_bytes()
    image = f["demo-image"].read_bytes()
    if image != c.files["demo-image"].read_bytes():  # the image role was mutated: send it in a valid request
        body = json.dumps({"task": "detection", "text": "red circle", "image": base64.b64encode(image).decode()})
        body = body.encode()
    pick = int(hashlib.sha256(body).hexdigest(), 16) % 8  # the header varies with the input, deterministically
    length = {0: str(len(body)), 1: "-1", 2: str(len(body) + 10**9), 3: "12abc", 4: "0"}.get(pick, str(len(body)))
    server = _demo_server()
    head = f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_SECONDS / 2) as sock:
        sock.sendall(head.encode() + body)
        if pick in (2,):  # a declared size far beyond the limit: the server answers after draining what it can
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    payload = rest.partition(b"\r\n\r\n")[2]
    if not 400 <= status < 500 or b'"error"' not in payload:
        raise RuntimeError(f"demo answered {status_line.decode(errors='replace')!r}: {payload[:200]!r}")
    return status


def _make_verify(fmt: str, root: Path) -> Callable[[dict[str, Path], Corpus], Any]:
    from fiber_data import verify_annotations
    from fiber_data.synthetic.config import SYNTHETIC_VQA_TEMPLATE

    def run(f: dict[str, Path], c: Corpus) -> Any:
        template = SYNTHETIC_VQA_TEMPLATE if fmt == "vqa-questions" else None
        report = verify_annotations(fmt, f[fmt], root, image_template=template)
        extra = ["--image-template", template] if template else []
        _verify_cli(["verify", "--format", fmt, "--ann", str(f[fmt]), "--images", str(root), "--quiet", *extra], report)
        return report

    return run


def _verify_cli(argv: list[str], report: Any) -> None:
    """``fiber-data verify`` on the same input: exit code 1 exactly when the report has errors, one line each."""
    import contextlib

    from fiber_data.cli import main as data_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = data_cli([*argv, "--max-listed", "0"])
    listed = sum(1 for line in out.getvalue().splitlines() if line.startswith("  ERROR "))
    if rc != (1 if report.errors else 0) or listed != len(report.errors) or err.getvalue():
        raise AssertionError(
            f"fiber-data verify exited {rc} listing {listed} errors for a report with {len(report.errors)} "
            f"(stderr: {err.getvalue()[:200]!r})"
        )


def _make_verify_image() -> Callable[[dict[str, Path], Corpus], Any]:
    from fiber_data import verify_annotations

    def run(f: dict[str, Path], c: Corpus) -> Any:
        folder = f["image"].parent
        ann = folder / "captions.json"
        ann.write_text(
            json.dumps(
                {"images": [{"id": 1, "file_name": f["image"].name}], "annotations": [{"image_id": 1, "caption": "x"}]}
            )
        )
        report = verify_annotations("coco-captions", ann, folder)
        _verify_cli(
            ["verify", "--format", "coco-captions", "--ann", str(ann), "--images", str(folder), "--quiet"], report
        )
        return report

    return run


# ------------------------------------------------------------------------------------------------ loop


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"no result after {HANG_SECONDS:.0f} s")


def _raise_site(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    own = [fr for fr in frames if "fiber_data" in fr.filename] or frames
    fr = own[-1] if own else None
    return f"{Path(fr.filename).name}:{fr.lineno} ({fr.name})" if fr else "?"


def _check_outcome(target: Target, result: Any, exc: BaseException | None) -> tuple[str, str | None]:
    """``(outcome, problem)``: problem is ``None`` when the contract holds."""
    from fiber_data.errors import DataError

    if exc is None:
        if target.verify:
            bad = [e for e in result.errors if not isinstance(e, DataError) or e.file is None]
            if bad:
                return "verify-errors", f"verify collected an error without a file: {bad[0]!r}"
            return ("verify-errors" if result.errors else "ok"), None
        return "ok", None
    if isinstance(exc, DataError):
        if target.verify:
            return "crash", f"verify raised instead of collecting: {type(exc).__name__}: {exc}"
        if exc.file is None:
            return "data-error", f"DataError without a file: {exc}"
        return "data-error", None
    return "crash", f"{type(exc).__name__}: {exc}"


def run_fuzz(
    iterations: int,
    seed: int = 0,
    *,
    workdir: Path | None = None,
    only_iteration: int | None = None,
    targets: list[str] | None = None,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> FuzzReport:
    """Run the fuzzer.

    Args:
        iterations: number of mutated inputs.
        seed: session seed; iteration ``i`` uses ``random.Random(f"{seed}:{i}")`` and replays alone.
        workdir: scratch folder (default: a temporary folder, removed afterwards).
        only_iteration: run just this iteration number (replay).
        targets: restrict to targets whose name starts with one of these prefixes.
        verbose: log every iteration.
        log: where progress lines go.

    Returns:
        The :class:`FuzzReport`.
    """
    import warnings

    from PIL import Image

    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fiber-fuzz-")) if workdir is None else Path(workdir)
    report = FuzzReport()
    t0 = time.perf_counter()
    previous_handler = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    old_limit = Image.MAX_IMAGE_PIXELS
    data_logger = logging.getLogger("fiber_data")
    old_level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # the loaders' warnings (skipped/repaired records) are expected here
    try:
        corpus = build_corpus(work / "corpus")
        all_targets = _targets(corpus)
        chosen = [t for t in all_targets if not targets or any(t.name.startswith(p) for p in targets)]
        if not chosen:
            raise ValueError(f"no target matches {targets}; targets: {[t.name for t in all_targets]}")
        # a flipped bit in a PNG header can declare a huge image; keep decompression bombs cheap to detect
        Image.MAX_IMAGE_PIXELS = 4_000_000
        iters = [only_iteration] if only_iteration is not None else range(iterations)
        for it in iters:
            rng = random.Random(f"{seed}:{it}")
            target = chosen[rng.randrange(len(chosen))]
            role = rng.choice(target.roles)
            scratch = work / "iter"
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir()
            files: dict[str, Path] = {}
            for r in set(target.roles) | ({"tsv-images", "tsv-labels", "tsv-hw"} if role == "tsv-lineidx" else set()):
                src = corpus.files[r]
                files[r] = scratch / src.name
                shutil.copyfile(src, files[r])
                if src.suffix == ".tsv":
                    shutil.copyfile(src.with_suffix(".lineidx"), files[r].with_suffix(".lineidx"))
            if role == "tsv-lineidx":
                files[role] = files["tsv-labels"].with_suffix(".lineidx")
            for r in target.roles:  # vqa needs both of its files; tsv needs all of its files
                files.setdefault(r, scratch / corpus.files[r].name)
            mutations: list[str] = [f"{role}"]
            try:
                data = files[role].read_bytes()
                files[role].write_bytes(target.mutators[role](files[role], data, rng, mutations))
            except Exception as exc:  # a mutator that cannot apply (e.g. a JSON line that is not JSON)
                mutations.append(f"mutator skipped: {type(exc).__name__}")
            result, error = None, None
            if previous_handler is not None:
                signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = target.run(files, corpus)
            except RecursionError as exc:
                error = exc
            except Exception as exc:
                error = exc
            finally:
                if previous_handler is not None:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            outcome, problem = _check_outcome(target, result, error)
            report.iterations += 1
            report.outcomes[outcome] += 1
            report.per_target[target.name] += 1
            if problem is not None:
                fail = FuzzFailure(
                    iteration=it,
                    target=target.name,
                    mutations=mutations,
                    error=problem,
                    where=_raise_site(error) if error is not None else "verify",
                    trace="".join(traceback.format_exception(error)) if error is not None else "",
                )
                report.failures.append(fail)
                if verbose:
                    log(fail.trace)
            if verbose:
                log(f"[{it}] {target.name} {mutations} -> {outcome}{'' if problem is None else ' FAIL ' + problem}")
    finally:
        if "server" in _DEMO:
            _DEMO.pop("server").stop()
        Image.MAX_IMAGE_PIXELS = old_limit
        data_logger.setLevel(old_level)
        if previous_handler is not None:
            signal.signal(signal.SIGALRM, previous_handler)
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: run the fuzzer and print the summary; exit 1 when a failure was found."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=1000, help="mutated inputs to try (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="session seed (default 0)")
    p.add_argument("--only-iteration", type=int, default=None, help="replay one iteration of the session")
    p.add_argument("--target", action="append", default=None, help="restrict to targets with this prefix")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--verbose", action="store_true", help="log every iteration and every failure's traceback")
    args = p.parse_args(argv)
    report = run_fuzz(
        args.iterations,
        args.seed,
        workdir=args.workdir,
        only_iteration=args.only_iteration,
        targets=args.target,
        verbose=args.verbose,
    )
    print(report.summary())
    if args.json is not None:
        payload = {
            "iterations": report.iterations,
            "seconds": round(report.seconds, 2),
            "outcomes": dict(report.outcomes),
            "per_target": dict(report.per_target),
            "failures": [
                {
                    "iteration": f.iteration,
                    "target": f.target,
                    "mutations": f.mutations,
                    "error": f.error,
                    "where": f.where,
                }
                for f in report.failures
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
