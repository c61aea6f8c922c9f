"""Retrieval cost and recall: ITC pre-rank + ITM re-rank of the top-k vs brute-force ITM over every pair.

Two parts, both through the project's own code (:class:`fiber_train.CoarseModel` for the model,
:func:`fiber_train.tasks.retrieval.reranked_scores` for the re-ranking, :func:`fiber_eval.recall_at_k`):

1. **Cost.** A ``fiber-tiny`` coarse model with random weights (the cost does not depend on the weights)
   measures the per-image and per-caption dual-encoder cost and the per-pair fused ITM cost (pairs scored in
   batches of ``--pair-batch``). For each size ``Ni × Nt`` (1k × 5k and 5k × 25k: COCO 1k/5k test sets) the
   time of ITC (embed everything + one similarity matmul, measured) plus the ITM re-rank of the candidate pairs
   (``rerank_candidates``, measured when there are at most ``--max-measured-pairs`` of them) is compared with
   brute-force ITM over all ``Ni·Nt`` pairs. Anything not run is extrapolated from the measured per-pair cost
   and flagged ``"extrapolated": true`` in the JSON.
2. **Recall.** A random model has chance-level recall, so recall is measured on *synthetic* score matrices:
   each caption ``j`` belongs to image ``j // 5``; ITC similarities are cosine similarities of noisy copies of a
   shared latent, and ITM scores see the latent with less noise (a better but costlier scorer). It shows how
   much recall the top-k shortcut gives up relative to brute-force ITM, for each k. It says nothing about
   the recall of a trained FIBER.

Usage::

    python benchmarks/retrieval.py [--sizes 1000x5000 5000x25000] [--k 16 128]
    python benchmarks/retrieval.py --quick
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from _common import Recorder, base_parser, finish, print_table, setup, time_fn
from torch import Tensor

from fiber_backbones import TextInputs, create_backbone
from fiber_eval import recall_at_k
from fiber_train import CoarseModel
from fiber_train.tasks.retrieval import rerank_candidates, reranked_scores

CAPTIONS_PER_IMAGE = 5


def _size(text: str) -> tuple[int, int]:
    ni, nt = text.lower().split("x")
    return int(ni), int(nt)


class PairScorer:
    """Fused ITM scorer over a pool of random images / captions (index modulo the pool size)."""

    def __init__(self, model: CoarseModel, pixels: Tensor, text: TextInputs) -> None:
        self.model, self.pixels, self.text = model, pixels, text

    @torch.no_grad()
    def __call__(self, rows: Tensor, cols: Tensor) -> Tensor:
        pix = self.pixels[rows % self.pixels.shape[0]]
        txt = self.text.index_select(cols % self.text.input_ids.shape[0])
        return self.model.itm_scores(pix, txt)


def synthetic_scores(
    ni: int, nt: int, dim: int, itc_noise: float, itm_noise: float, seed: int
) -> tuple[Tensor, Tensor, np.ndarray]:
    """ITC ``[Ni, Nt]`` cosine similarities, ITM ``[Ni, Nt]`` scores and ``text_to_image [Nt]`` (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    t2i = np.arange(nt) // CAPTIONS_PER_IMAGE % ni
    latent = torch.randn(ni, dim, generator=g)
    cap_latent = latent[torch.from_numpy(t2i)] + 0.5 * torch.randn(nt, dim, generator=g)

    def noisy(x: Tensor, s: float) -> Tensor:
        y = x + s * torch.randn(x.shape, generator=g)
        return y / y.norm(dim=1, keepdim=True)

    itc = noisy(latent, itc_noise) @ noisy(cap_latent, itc_noise).T
    itm = noisy(latent, itm_noise) @ noisy(cap_latent, itm_noise).T
    return itc, itm, t2i


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=None, help="NixNt (default 1000x5000 5000x25000)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="re-rank depths (default 16 64 128)")
    p.add_argument("--pair-batch", type=int, default=None, help="pairs per fused ITM call (default 64, quick 16)")
    p.add_argument("--max-measured-pairs", type=int, default=None, help="re-rank actually run up to this many pairs")
    p.add_argument("--recall-dim", type=int, default=64)
    p.add_argument(
        "--recall-max-pairs",
        type=int,
        default=5_000_000,
        help="synthetic recall only for sizes with at most this many pairs (ranking 125M pairs takes minutes)",
    )
    args = p.parse_args(argv)
    dev = setup(args, repeat=(3, 2), warmup=(1, 1))
    args.pair_batch = args.pair_batch or (16 if args.quick else 64)
    sizes = [_size(s) for s in (args.sizes or (["10x50", "20x100"] if args.quick else ["1000x5000", "5000x25000"]))]
    ks = args.k or ([2, 4] if args.quick else [16, 64, 128])
    max_pairs = args.max_measured_pairs if args.max_measured_pairs is not None else (300 if args.quick else 20_000)
    rec = Recorder(
        "retrieval",
        args,
        {
            "model": "fiber-tiny (random weights)",
            "sizes": [f"{a}x{b}" for a, b in sizes],
            "k": ks,
            "pair_batch": args.pair_batch,
            "max_measured_pairs": max_pairs,
            "captions_per_image": CAPTIONS_PER_IMAGE,
        },
    )
    torch.manual_seed(0)
    backbone = create_backbone("fiber-tiny")
    cfg = backbone.config
    model = CoarseModel(backbone, cfg.text.vocab_size, 32, 32, {"itc": 1.0, "itm": 1.0, "mlm": 1.0}).to(dev).eval()
    pool = args.pair_batch
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(pool, 3, cfg.swin.img_size, cfg.swin.img_size, generator=g).to(dev)
    ids = torch.randint(3, cfg.text.vocab_size, (pool, 16), generator=g)
    text = TextInputs(ids, torch.ones_like(ids, dtype=torch.bool)).to(dev)
    scorer = PairScorer(model, pixels, text)

    # ---- unit costs (per item / per pair), measured on full batches
    with torch.no_grad():
        t_img = time_fn(lambda: model.embed_images(pixels), dev, args.repeat, args.warmup)["min_s"] / pool
        t_txt = time_fn(lambda: model.embed_texts(text), dev, args.repeat, args.warmup)["min_s"] / pool
        idx = torch.arange(pool)
        t_pair = time_fn(lambda: scorer(idx, idx), dev, args.repeat, args.warmup)["min_s"] / pool
    rec.doc["unit_costs_ms"] = {"embed_image": t_img * 1e3, "embed_text": t_txt * 1e3, "itm_pair": t_pair * 1e3}

    for ni, nt in sizes:
        # ITC: embedding cost extrapolated from the per-item cost, similarity + candidate selection measured
        emb_i = torch.nn.functional.normalize(torch.randn(ni, 32, generator=g), dim=1)
        emb_t = torch.nn.functional.normalize(torch.randn(nt, 32, generator=g), dim=1)
        t0 = time.perf_counter()
        sim = emb_i @ emb_t.T
        t_sim = time.perf_counter() - t0
        t_itc = ni * t_img + nt * t_txt + t_sim
        brute_pairs = ni * nt
        brute = {"pairs": brute_pairs, "seconds": brute_pairs * t_pair, "extrapolated": True}
        if brute_pairs <= max_pairs:
            t0 = time.perf_counter()
            reranked_scores(sim, 0, scorer, batch_size=args.pair_batch)
            brute = {"pairs": brute_pairs, "seconds": time.perf_counter() - t0, "extrapolated": False}
        rec.add(
            {
                "size": f"{ni}x{nt}",
                "method": "brute_force_itm",
                "k": None,
                "itm_pairs": brute["pairs"],
                "itc_s": 0.0,
                "itm_s": brute["seconds"],
                # brute force runs the fused model on every pair directly: no dual-encoder pass
                "total_s": brute["seconds"],
                "extrapolated": brute["extrapolated"],
            }
        )
        for k in ks:
            t0 = time.perf_counter()
            n_cand = int(rerank_candidates(sim, k).sum())
            t_select = time.perf_counter() - t0
            if n_cand <= max_pairs:
                t0 = time.perf_counter()
                _, n_scored = reranked_scores(sim, k, scorer, batch_size=args.pair_batch)
                t_itm, extrap = time.perf_counter() - t0, False
                assert n_scored == n_cand
            else:
                t_itm, extrap = n_cand * t_pair, True
            rec.add(
                {
                    "size": f"{ni}x{nt}",
                    "method": "itc_topk_itm",
                    "k": k,
                    "itm_pairs": n_cand,
                    "itc_s": t_itc + t_select,
                    "itm_s": t_itm,
                    "total_s": t_itc + t_select + t_itm,
                    "extrapolated": extrap,
                }
            )
        base = rec.results[-len(ks) - 1]["total_s"]
        for r in rec.results[-len(ks) :]:
            r["speedup_vs_brute"] = base / r["total_s"]

    # ---- recall on synthetic score matrices
    recall_rows: list[dict[str, Any]] = []
    for ni, nt in sizes:
        if ni * nt > args.recall_max_pairs:
            rec.note(f"recall_synthetic skipped for {ni}x{nt} (> --recall-max-pairs {args.recall_max_pairs})")
            continue
        itc, itm, t2i = synthetic_scores(ni, nt, args.recall_dim, itc_noise=1.5, itm_noise=0.8, seed=0)

        def lookup(rows: Tensor, cols: Tensor, itm: Tensor = itm) -> Tensor:
            return itm[rows, cols]

        variants: list[tuple[str, int | None, Tensor]] = [("itc_only", None, itc), ("brute_force_itm", None, itm)]
        for k in ks:
            variants.append(("itc_topk_itm", k, reranked_scores(itc, k, lookup, batch_size=1 << 20)[0]))
        for method, k, scores in variants:
            r = recall_at_k(scores.numpy(), t2i)
            recall_rows.append(
                {"size": f"{ni}x{nt}", "method": method, "k": k, **{m: round(v, 2) for m, v in r.items()}}
            )
    rec.doc["recall_synthetic"] = recall_rows
    rec.note("cost: fiber-tiny with random weights; brute-force and large re-ranks are extrapolated where flagged")
    rec.note(
        "recall_synthetic: synthetic score matrices (ITC noise 1.5, ITM noise 0.8 on a shared latent), "
        "not a trained model; it isolates the recall lost by re-ranking only the top-k"
    )
    rec.doc["unit_costs_ms"] = {k: round(v, 4) for k, v in rec.doc["unit_costs_ms"].items()}
    print(f"unit costs (ms): {rec.doc['unit_costs_ms']}")
    finish(
        rec,
        rec.results,
        ["size", "method", "k", "itm_pairs", "itc_s", "itm_s", "total_s", "speedup_vs_brute", "extrapolated"],
    )
    print()
    print_table(recall_rows, ["size", "method", "k", "i2t/R@1", "i2t/R@5", "t2i/R@1", "t2i/R@5", "rsum"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
