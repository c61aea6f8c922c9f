"""Byte-level BPE throughput: training and batch encoding of synthetic-world captions.

Generates ``--captions`` captions with the synthetic world's caption writer (seeded, the same text every run),
trains :class:`fiber_data.ByteBPETokenizer` on them (``--vocab-size`` ids) and encodes all of them as the
collators do: ``tokenizer(batch, max_length=40)`` per batch of ``--batch`` captions, producing ids, the
attention mask and character offsets.

Rows:

- ``train``: training time on all captions;
- ``encode_cold``: a freshly loaded tokenizer encodes all captions once (pays any per-word cache warm-up);
- ``encode_warm``: the same tokenizer encodes them again (the steady state of a training run).

``cpu_min_s`` (process CPU time) is the figure to compare on a shared machine; ``--threads 1`` and
``TOKENIZERS_PARALLELISM=false`` keep both implementations on one core.

Usage::

    python benchmarks/tokenization.py [--captions 30000] [--batch 256] [--out benchmarks/results/tokenization.json]
    python benchmarks/tokenization.py --quick
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Recorder, base_parser, finish, setup, time_fn

from fiber_data import ByteBPETokenizer
from fiber_data.synthetic.config import PALETTE, SHAPES
from fiber_data.synthetic.language import caption as _caption
from fiber_data.synthetic.scene import SceneObject as _Object


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` synthetic-world captions (1-4 objects each), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    colors = list(PALETTE)
    out: list[str] = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        cells = rng.choice(9, size=k, replace=False)
        objects = [
            _Object(
                colors[int(rng.integers(len(colors)))],
                SHAPES[int(rng.integers(len(SHAPES)))],
                "large" if rng.random() < 0.5 else "small",
                int(c),
                (0, 0, 1, 1),
            )
            for c in sorted(cells)
        ]
        out.append(_caption(objects, rng)[0])
    return out


def encode_all(tok: ByteBPETokenizer, texts: list[str], batch: int, max_length: int) -> int:
    """Encode ``texts`` batch by batch; returns the number of real tokens (a checksum of the work done)."""
    n = 0
    for i in range(0, len(texts), batch):
        n += int(tok(texts[i : i + batch], max_length=max_length).attention_mask.sum())
    return n


def main() -> None:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--captions", type=int, default=30_000, help="number of captions (default 30000)")
    p.add_argument("--batch", type=int, default=256, help="captions per tokenizer call (default 256)")
    p.add_argument("--max-length", type=int, default=40, help="token budget with <s> and </s> (default 40)")
    p.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size (default 1000)")
    args = p.parse_args()
    if args.quick:
        args.captions = min(args.captions, 2000)
    dev = setup(args, repeat=(3, 1), warmup=(0, 0))
    settings = {k: getattr(args, k) for k in ("captions", "batch", "max_length", "vocab_size")}
    rec = Recorder("tokenization", args, settings)
    texts = captions(args.captions)
    rec.note(f"implementation: {ByteBPETokenizer.__module__}.{ByteBPETokenizer.__qualname__}")

    holder: dict[str, ByteBPETokenizer] = {}

    def train() -> None:
        holder["tok"] = ByteBPETokenizer.train(texts, args.vocab_size)

    row = {"name": "train", **time_fn(train, dev, args.repeat, args.warmup)}
    tok = holder["tok"]
    row["vocab_size"] = tok.vocab_size
    rec.add(row)

    with tempfile.TemporaryDirectory() as tmp:
        path = tok.save(Path(tmp) / "tokenizer.json")
        cold: list[float] = []
        cold_cpu: list[float] = []
        tokens = 0
        for _ in range(args.repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            fresh = ByteBPETokenizer.load(path)
            tokens = encode_all(fresh, texts, args.batch, args.max_length)
            cold.append(time.perf_counter() - t0)
            cold_cpu.append(time.process_time() - c0)
    rec.add(
        {
            "name": "encode_cold",
            "median_s": float(np.median(cold)),
            "min_s": min(cold),
            "cpu_median_s": float(np.median(cold_cpu)),
            "cpu_min_s": min(cold_cpu),
            "tokens": tokens,
        }
    )
    encode_all(tok, texts, args.batch, args.max_length)  # fill any cache
    warm = time_fn(lambda: encode_all(tok, texts, args.batch, args.max_length), dev, args.repeat, 0)
    rec.add({"name": "encode_warm", **warm, "tokens": tokens, "captions_per_s": args.captions / warm["min_s"]})
    finish(rec, rec.results, ["name", "median_s", "min_s", "cpu_min_s", "tokens"])


if __name__ == "__main__":
    main()
