#!/usr/bin/env python
"""What the held-out ITM test of a coarse run asks for, and whether its fused text reads the image (issue 19).

For a ``fiber-train coarse`` run on a synthetic world (a run directory with ``config.yaml`` and ``model/``):

1. **Hard negatives.** ``fusion_metrics`` pairs the first caption of each held-out image with the most
   ITC-similar wrong caption and the most ITC-similar wrong image. Using the objects the world wrote for every
   image (``instances_<split>.json``, ``attributes``), each pair is classified by how the two scenes differ
   (``count``; one object's ``colour`` / ``shape`` / ``size`` / ``position`` or a combination; ``multi``: two or
   more objects; ``same``: identical scenes, i.e. a true match), and counted when a *presence check* (same number
   of objects, same multiset of colours and of shapes; no binding, size or position) already tells them apart.
   ``presence_check_itm_acc`` is the ITM accuracy of that check on the test (1 positive : 2 negatives).
2. **Colour readout.** On the captions of one-object images the colour word is replaced by ``<mask>``: the MLM
   head's choice among the palette colours with the caption's own image, a shuffled image and fusion off, and a
   logistic-regression probe (even rows train, odd rows score) on the fused hidden state at the masked position,
   standardised and raw. ``top5_variance_share``: the share of those states' variance in their top 5 principal
   directions.

Prints a summary and writes JSON (``--out``). Usage::

    python scripts/fusion_diagnostics.py runs/coarse-20261206-012347 --out diag.json

``data.root`` of the run's config is read relative to the current directory (``--data-root`` overrides it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: one object: (colour, shape, size, position)
SceneObject = tuple[str, str, str, str]
#: one image's objects, sorted
Scene = tuple[SceneObject, ...]
FIELDS = ("colour", "shape", "size", "position")


def scene_difference(a: Scene, b: Scene) -> str:
    """How scene ``b`` differs from scene ``a``: ``same``, ``count``, ``multi`` (two or more objects differ) or
    the ``+``-joined fields in which the one differing object differs (``colour+shape``)."""
    if len(a) != len(b):
        return "count"
    only_a = list(a)
    only_b = []
    for obj in b:
        if obj in only_a:
            only_a.remove(obj)
        else:
            only_b.append(obj)
    if not only_a:
        return "same"
    if len(only_a) > 1:
        return "multi"
    return "+".join(f for f, u, v in zip(FIELDS, only_a[0], only_b[0]) if u != v)


def presence_check_rejects(a: Scene, b: Scene) -> bool:
    """Whether counting the objects and comparing the multisets of colours and of shapes tells ``b`` from ``a``."""
    return len(a) != len(b) or any(sorted(o[f] for o in a) != sorted(o[f] for o in b) for f in (0, 1))


def linear_probe(x: Tensor, y: Tensor, *, num_classes: int, standardise: bool = True, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression ``x [N, D] -> y [N]``: trained (Adam, lr 0.05,
    L2 1e-3) on the even rows, scored on the odd rows; ``standardise`` scales every feature by its training
    mean and standard deviation first."""
    x = x.float()
    train = torch.arange(len(y)) % 2 == 0
    if standardise:
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[train] @ w + b, y[train]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((x[~train] @ w + b).argmax(1) == y[~train]).float().mean())


def load_scenes(root: Path, split: str) -> dict[int, Scene]:
    """Objects of every image of a synthetic world's split, by COCO image id."""
    path = root / "annotations" / f"instances_{split}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: the diagnostics need a synthetic world (pass --data-root)")
    doc = json.loads(path.read_text())
    objects: dict[int, list[SceneObject]] = defaultdict(list)
    for ann in doc["annotations"]:
        at = ann["attributes"]
        objects[int(ann["image_id"])].append((at["color"], at["shape"], at["size"], at["position"]))
    return {int(im["id"]): tuple(sorted(objects[int(im["id"])])) for im in doc["images"]}


def hard_negative_report(scores: Tensor, text_to_image: np.ndarray, scenes: Sequence[Scene], n: int) -> dict[str, Any]:
    """Classify the ITC-hardest wrong caption and image of the first ``n`` images, picked as ``fusion_metrics``
    picks them (``scores [N_img, N_txt]``, ``text_to_image [N_txt]``, ``scenes`` by image row)."""
    from fiber_train.tasks.coarse import hardest_negatives

    t2i = torch.as_tensor(text_to_image)
    query = torch.tensor([int(np.flatnonzero(text_to_image == i)[0]) for i in range(n)])
    text_neg, image_neg = hardest_negatives(scores, t2i, query)
    captions: Counter[str] = Counter()
    images: Counter[str] = Counter()
    rejected = {"captions": 0, "images": 0}
    for i in range(n):
        neg_caption_scene, neg_image_scene = scenes[int(t2i[text_neg[i]])], scenes[int(image_neg[i])]
        captions[scene_difference(scenes[i], neg_caption_scene)] += 1
        images[scene_difference(scenes[i], neg_image_scene)] += 1
        rejected["captions"] += presence_check_rejects(scenes[i], neg_caption_scene)
        rejected["images"] += presence_check_rejects(scenes[i], neg_image_scene)
    return {
        "num_queries": n,
        "caption_negatives": dict(captions.most_common()),
        "image_negatives": dict(images.most_common()),
        "presence_check_rejects": rejected,
        "presence_check_itm_acc": (n + rejected["captions"] + rejected["images"]) / (3 * n),
        "identical_scene_negatives": captions["same"] + images["same"],
    }


@torch.no_grad()
def colour_readout(
    model: Any, tokenizer: Any, corpus: Any, scenes: Sequence[Scene], transform: Any, *, max_length: int
) -> dict[str, Any]:
    """MLM choice and linear probes of the colour of one-object images at the masked colour word (module doc)."""
    from fiber_backbones import TextInputs
    from fiber_data.synthetic.config import PALETTE

    colours = list(PALETTE)
    colour_ids = []
    for c in colours:
        ids = [t for t in tokenizer([" " + c], max_length=8).input_ids[0].tolist() if t not in tokenizer.special_ids]
        colour_ids.append(ids[0] if len(ids) == 1 else -1)
    rows = [
        (t, int(img))
        for t, img in enumerate(corpus.text_to_image)
        if len(scenes[int(img)]) == 1 and colour_ids[colours.index(scenes[int(img)][0][0])] >= 0
    ]
    enc = tokenizer([corpus.texts[t] for t, _ in rows], max_length=max_length)
    ids, mask = enc.input_ids.long().clone(), enc.attention_mask.bool()
    keep, positions, labels = [], [], []
    for r, (_, img) in enumerate(rows):
        label = colours.index(scenes[img][0][0])
        hits = (ids[r] == colour_ids[label]).nonzero().flatten()
        if len(hits) == 1:  # the caption names the colour exactly once
            keep.append(r)
            positions.append(int(hits[0]))
            labels.append(label)
    ids, mask = ids[keep], mask[keep]
    pos, y = torch.tensor(positions), torch.tensor(labels)
    at = torch.arange(len(keep))
    ids[at, pos] = tokenizer.mask_token_id
    images = corpus.image_dataset(transform)
    pixels = torch.stack([images[rows[r][1]][0] for r in keep])
    shuffled = pixels[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))]
    candidates = torch.tensor(colour_ids)
    valid = candidates >= 0
    out: dict[str, Any] = {"num_captions": len(keep), "most_frequent_colour": float(torch.bincount(y).max()) / len(y)}
    hidden = {}
    for name, px, fuse in (("own", pixels, True), ("shuffled", shuffled, True), ("unfused", pixels, False)):
        fused = model.backbone(px, TextInputs(ids, mask), fuse=fuse)
        hidden[name] = fused.text.hidden[at, pos].float()
        logits = model.mlm_score.logits(model.projection(fused).text_feats)[at, pos]
        choice = candidates[valid][logits[:, candidates[valid]].argmax(-1)]
        out[f"mlm_acc/{name}"] = float((choice == candidates[y]).float().mean())
        out[f"mlm_colour_mass/{name}"] = float(logits.softmax(-1)[:, candidates[valid]].sum(-1).mean())
        out[f"probe/{name}"] = linear_probe(hidden[name], y, num_classes=len(colours))
    out["probe_raw/own"] = linear_probe(hidden["own"], y, num_classes=len(colours), standardise=False)
    centred = hidden["own"] - hidden["own"].mean(0)
    energy = torch.linalg.svdvals(centred).pow(2)
    out["top5_variance_share"] = float(energy[:5].sum() / energy.sum())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("run", type=Path, help="a fiber-train coarse run directory (config.yaml, model/)")
    parser.add_argument("--queries", type=int, default=200, help="held-out images, as eval.fusion_queries")
    parser.add_argument("--data-root", type=Path, default=None, help="the synthetic world (default: data.root)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    import fiber_models
    from fiber_train.checkpoint import atomic_write_text
    from fiber_train.config import CoarseConfig, load_config
    from fiber_train.tasks.coarse import CoarseModel, CoarsePretrainTask, _encode_eval_split

    torch.set_num_threads(args.threads)
    if not (args.run / "config.yaml").is_file() or not (args.run / "model").is_dir():
        raise SystemExit(f"error: {args.run} is not a coarse run directory (needs config.yaml and model/)")
    overrides = [] if args.data_root is None else [f"data.root={args.data_root}"]
    cfg = load_config(CoarseConfig, recipe=args.run / "config.yaml", overrides=overrides)
    root, split = Path(cfg.data.root), cfg.data.eval_split
    scenes_by_id = load_scenes(root, split)
    task = CoarsePretrainTask(cfg)
    model = fiber_models.load(args.run / "model").eval()
    if not isinstance(model, CoarseModel):
        raise SystemExit(f"error: {args.run}/model is a {type(model).__name__}, not a coarse model")
    transform = task.image_transform()
    corpus, scores, _ = _encode_eval_split(model, cfg.data, task.tokenizer, transform, device="cpu", batch_size=64)
    scenes = [scenes_by_id[int(i)] for i in corpus.image_ids]
    n = min(args.queries, scores.shape[0])
    report = {
        "run": str(args.run),
        "split": split,
        "hard_negatives": hard_negative_report(scores, np.asarray(corpus.text_to_image), scenes, n),
        "colour_readout": colour_readout(
            model, task.tokenizer, corpus, scenes, transform, max_length=cfg.data.max_text_len
        ),
    }
    hn, cr = report["hard_negatives"], report["colour_readout"]
    print(f"hard negatives of {n} held-out images ({split}):")
    print(f"  wrong captions differ by: {hn['caption_negatives']}")
    print(f"  wrong images differ by:   {hn['image_negatives']}")
    print(
        f"  a presence check (count, colours, shapes) rejects {hn['presence_check_rejects']['captions']}/{n} "
        f"captions and {hn['presence_check_rejects']['images']}/{n} images: ITM accuracy "
        f"{100 * hn['presence_check_itm_acc']:.1f}% (prior 66.7%); identical scenes: {hn['identical_scene_negatives']}"
    )
    print(
        f"colour of {cr['num_captions']} one-object images at the masked colour word (most frequent colour "
        f"{100 * cr['most_frequent_colour']:.1f}%):"
    )
    for name in ("own", "shuffled", "unfused"):
        print(
            f"  {name:8s} image: MLM {100 * cr[f'mlm_acc/{name}']:5.1f}% (colour mass "
            f"{cr[f'mlm_colour_mass/{name}']:.2f}), probe {100 * cr[f'probe/{name}']:5.1f}%"
        )
    print(
        f"  raw probe (own) {100 * cr['probe_raw/own']:.1f}%; top-5 directions hold "
        f"{100 * cr['top5_variance_share']:.2f}% of the variance"
    )
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
