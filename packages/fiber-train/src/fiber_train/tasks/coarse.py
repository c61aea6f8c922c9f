"""Coarse-grained pre-training: ITC + ITM with hard negatives + MLM (docs/reference/training.md §1).

Per micro-batch of ``B`` pairs, as the reference:

1. MLM: a fused forward on the masked captions; the MLM head reads the projected text tokens.
2. ITC: image-only and text-only forwards (fusion off); contrastive loss with learnable temperature.
3. ITM: a fused forward on ``3B`` pairs, one hard-negative caption per image and one hard-negative image per
   caption drawn from the ITC similarities.

Hard negatives are drawn from the local micro-batch (``B`` candidates). With the ITC queue enabled the
reference also draws from queued entries; that needs the queued inputs re-fetched and is not implemented
here yet (the queue still enters the ITC loss).

At the end of a run :func:`fusion_metrics` proves (or not) that the *fused* path learned, each figure beside
its baseline: ITM accuracy on 1 positive : 2 ITC-hard negatives vs the 2/3 prior, text->image R@1 of ITC
alone vs ITC top-k re-ranked by ITM, MLM accuracy vs a unigram baseline, and the gate values.

Why ITM does not learn in the tiny default (``coarse/tiny``; issue 19), as measured so far — experiments of
100-200 steps on the synthetic world, batch 32, logged ``itm/acc`` averaged over 25 steps:

- every variant sits at the prior from about step 40 on (``itm/acc`` 0.667, ``itm/loss`` 0.637 =
  the entropy of 1:2): the reference settings; gates forced to 1 (fusion fully open from step 0);
  ``lr_mult_cross_modal = lr_mult_head = 10``; ``optim.lr = 1e-3``; ITM alone (``loss.itc = loss.mlm = 0``);
  uniformly random negatives instead of ITC-hard ones; unit-gain (``std = 1/sqrt(fan_in)``) initialisation of
  the projections, poolers and ITM ``fc``; cross-attention weights at ``std = 1/sqrt(fan_in)``. Only ITM alone
  at ``lr = 1e-3`` with open gates lowered the loss (0.637 -> 0.58 by step 150), without moving the accuracy;
- ``model.share_prefix = false`` (the reference's per-pass recomputation) gives the same numbers to three
  decimals as the shared-prefix path, and with open gates the fused features do depend on the pairing
  (swapping the caption moves the image tokens by 22 % of their norm at initialisation): the fused path
  reaches the ITM head; no wiring defect was found;
- the gates are not the bottleneck (forcing them open changes nothing in 100 steps), but they stay at
  ``|alpha| <= 0.02`` when trained from zero, because the ITM loss gives them no consistent direction;
- after 100 default steps the pooled ``cls`` halves vary across samples by only ~8 % (text) and ~24 % (image)
  of their magnitude: a component shared by all samples dominates the mean-pooled fused features, so the
  linear ITM head has little per-pair signal to read, whereas ITC (L2-normalised, temperature 0.07) is
  insensitive to that scale and learns at once.

Measured on 2026-12-05 (Intel AMX machine, 300-400 steps, one thread; the probe scripts are described in the
issue note): the fused path carries no image information at all within the budget, for any objective:

- MLM does not read the image: on 891 masked *colour* words (the only tokens the caption context cannot
  give away) the default run predicts no colour at all (it answers " the"), with its own image or a shuffled
  one. With the gates forced to 1 and ``optim.lr`` 1e-3 / 3e-3 the MLM learns the slot (85-97 % of the
  probability on colour words) but picks the colour at chance (12.5 % / 15.6 % over 8 colours); at those rates
  ITC collapses (loss = ln 32 throughout, R@1 <= 1 %);
- a logistic-regression probe on standardised fused ``cls`` features, positive vs random-negative pairs (1:1),
  reaches 40-42 % held out (chance 50 %): there is no matching signal for any head to read, so the ITM head,
  its initialisation and the pooling are not the bottleneck;
- initialising every linear layer at unit gain (``std = 1/sqrt(fan_in)``) makes ITC collapse as well.

With the gates opened (``fusion.gate_init = 1``) and the fusion, projections and heads at 3x the learning rate,
the same probe reaches 77 % after 600 joint steps, yet held-out ITM on ITC-hard negatives stays at the prior;
ITM alone on top of a trained default run (towers at 0.3x) reaches 84 % held out and re-ranks +12.5 R@1 over
that model's ITC, but only while ITC is off (the mined negatives get easier as ITC degrades). The table and
settings are in docs/guides/fusion-from-scratch.md.

Measured on 2026-12-06 (same setting; docs/guides/fusion-from-scratch.md): the held-out negatives are mostly
*not* binding tests: 193 of the 200 ITC-hardest wrong captions (194 of 200 wrong images) come from scenes with
another object count or another multiset of colours or shapes, so checking which colours and shapes are present
would score about 98 %. With open gates the cross-attention does carry an image's colour into the masked colour
token within 400 steps (a standardised linear probe reads it at 75-77 % against 21 % with a shuffled image),
yet the MLM head answers the same colour for every image: the masked-token states span about five directions
(over 99.5 % of their variance) and the image's information lies in the rest, where a head learns slowly.
Centring the ITM input, 30x the head learning rate, gates of 10 or 30, fusion at finer image grids and a
width-scaled initialisation leave ITM at the prior in 400 steps.

So the stall is an optimisation plateau of learning to read the cross-modal signal from scratch in a few hundred
steps, not a defect of the gates, multipliers, negatives or the shared-prefix path; the paper recipes keep the
reference settings (zero gates, official multipliers). Not solved: see issue 19.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fiber_backbones import TextInputs, WeightsMismatchError
from fiber_backbones.weights import abbreviate_keys
from fiber_data import (
    CocoCaptionsDataset,
    EmptyBatch,
    ImageTextBatch,
    ImageTextCollator,
    ImageTransform,
    SkipBadSamples,
    load_retrieval_corpus,
    mask_tokens,
)
from fiber_eval.retrieval import recall_at_k
from fiber_heads import (
    GatherFn,
)
from fiber_models.coarse import CoarseModel as CoarseModel
from fiber_models.pretrained import initialize_from
from fiber_train.config import CoarseConfig, DataConfig, to_dict
from fiber_train.data_sources import OnError, TrainData, WeightedMixtureSampler, build_train_data
from fiber_train.loop import gate_values
from fiber_train.optim import build_param_groups
from fiber_train.tasks.base import DataTokenizer, Fabricish, TaskHooks, build_backbone, save_coarse_family

log = logging.getLogger(__name__)


def _dataset_paths(data: DataConfig, split: str) -> tuple[Path, Path]:
    root = Path(data.root)
    return root / "annotations" / f"captions_{split}.json", root / "images" / split


def _missing_data_message(data: DataConfig, missing: Path) -> str:
    return (
        f"{missing} not found. `fiber-train coarse --data DIR` expects a COCO-captions layout: "
        f"DIR/annotations/captions_<split>.json and DIR/images/<split>/ (splits '{data.train_split}' and "
        f"'{data.eval_split}'), plus a tokenizer (DIR/tokenizer.json or data.tokenizer=PATH_OR_HUB_NAME). "
        "Create such a folder with `fiber-data synth --out DIR`, or see the data formats in "
        "packages/fiber-data/README.md."
    )


class CoarsePretrainTask(DataTokenizer, TaskHooks):
    """``fiber-train coarse``: the coarse pre-training task (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "coarse"

    def __init__(self, config: CoarseConfig) -> None:
        self.config = config
        self._model: CoarseModel | None = None
        self._train_data: TrainData | None = None
        self._skipped_records: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        """Training state outside the weights: the ITC queue (saved in checkpoints for exact resume)."""
        return {} if self._model is None else {"itc_queue": self._model.itc.queue_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._model is not None and "itc_queue" in state:
            self._model.itc.load_queue_state(state["itc_queue"])

    # ------------------------------------------------------------------------------------------- data

    def prepare_data(self) -> None:
        """Generate the synthetic world when asked for and absent; check that every needed file exists."""
        data = self.config.data
        if data.format == "synthetic":
            data.ensure_synthetic_world(progress=self.config.trainer.progress)
        elif data.format != "coco-captions":
            raise ValueError(f"data.format must be 'synthetic' or 'coco-captions', got {data.format!r}")
        for split in (data.eval_split,) if data.sources else dict.fromkeys((data.train_split, data.eval_split)):
            for path in _dataset_paths(data, split):
                if not path.exists():
                    raise FileNotFoundError(_missing_data_message(data, path))
        self.check_tokenizer()

    def image_transform(self) -> ImageTransform:
        if self.config.data.image_decoder == "torchvision":
            from fiber_data.images.tv_decode import TorchvisionImageTransform

            return TorchvisionImageTransform(self.config.data.image_size)
        return ImageTransform(self.config.data.image_size)

    def train_dataset(self, fabric: Fabricish | None = None) -> Dataset:
        data = self.config.data
        on_error = cast(OnError, data.on_error)  # checked in the config's __post_init__
        if data.sources:
            rank, world = (0, 1) if fabric is None else (fabric.global_rank, fabric.world_size)
            self._train_data = build_train_data(
                data.sources,
                self.image_transform(),
                seed=self.config.trainer.seed,
                rank=rank,
                world_size=world,
                on_error=on_error,
            )
            if isinstance(self._train_data.dataset, IterableDataset):
                return self._train_data.dataset  # streams apply data.on_error themselves (build_train_data)
            return SkipBadSamples(self._train_data.dataset, policy=on_error, name="sources")
        ann, images = _dataset_paths(data, data.train_split)
        dataset = CocoCaptionsDataset(ann, images, transform=self.image_transform(), on_error=on_error)
        self._skipped_records = {data.train_split: len(dataset.table.skipped_records)}
        return SkipBadSamples(dataset, policy=on_error, name=data.train_split)

    def data_report(self) -> dict[str, int]:
        """Caption records the training loader left out as bad (``data.on_error=skip``), as
        ``{"<split>/caption_records_skipped": count}`` (non-zero only); the trainer logs it."""
        return {f"{k}/caption_records_skipped": n for k, n in self._skipped_records.items() if n}

    def train_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> Any:
        """A weighted mixture sampler when ``data.sources`` carry weights; ``None`` (uniform) otherwise."""
        if self._train_data is None or not self._train_data.weights:
            return None
        return WeightedMixtureSampler(self._train_data.sizes, self._train_data.weights, seed, rank, world_size)

    def collate_fn(self) -> Callable[[list[Any]], ImageTextBatch | EmptyBatch]:
        return ImageTextCollator(
            self.tokenizer,
            max_length=self.config.data.max_text_len,
            mlm_probability=self.config.loss.mlm_probability if self.config.loss.mlm > 0 else 0.0,
        )

    # ------------------------------------------------------------------------------------------ model

    def build_model(self, fabric: Fabricish | None = None) -> CoarseModel:
        cfg = self.config
        backbone = build_backbone(cfg.model, self.tokenizer.vocab_size)
        model = CoarseModel(
            backbone,
            vocab_size=self.tokenizer.vocab_size,
            hidden_dim=cfg.model.hidden_dim,
            itc_dim=cfg.model.itc_dim,
            loss_weights={"itc": cfg.loss.itc, "itm": cfg.loss.itm, "mlm": cfg.loss.mlm},
            queue_size=cfg.loss.queue_size,
            temperature_init=cfg.loss.temperature_init,
            share_prefix=cfg.model.share_prefix,
            gather=fabric_gather(fabric) if fabric is not None and fabric.world_size > 1 else None,
            rank=0 if fabric is None else fabric.global_rank,
            text_pool=cfg.model.text_pool,
        )
        if cfg.model.pretrained:
            load_pretrained_into(model, Path(cfg.model.pretrained))
        self._model = model
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        assert isinstance(model, CoarseModel)
        cross_modal = [*model.backbone.fusion_parameters(), *model.projection.parameters()]
        cross_modal += [p for n, p in model.itc.named_parameters() if n != "temp"]
        heads = [*model.itm_score.parameters(), *model.mlm_score.parameters()]
        no_decay = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
        return build_param_groups(model, self.config.optim, {"cross_modal": cross_modal, "head": heads}, no_decay)

    # ----------------------------------------------------------------------------------------- evaluate

    @torch.no_grad()
    def evaluate(self, model: nn.Module, fabric: Fabricish) -> dict[str, float]:
        """Zero-shot image-text retrieval (ITC dual encoder) on ``data.eval_split``: R@1/5/10 both ways; with
        ``eval.fusion`` also the fused-path proof of :func:`fusion_metrics` and the gate values (``gate/*``)."""
        assert isinstance(model, CoarseModel)
        ev, out = self.config.eval, {}
        args = (model, self.config.data, self.tokenizer, self.image_transform())
        if ev.retrieval:
            out.update(retrieval_metrics(*args, device=fabric.device, batch_size=ev.batch_size))
        if ev.fusion and self.config.loss.itm > 0:
            out.update(
                fusion_metrics(
                    *args,
                    device=fabric.device,
                    batch_size=ev.batch_size,
                    max_queries=ev.fusion_queries,
                    rerank_k=ev.rerank_k,
                    mlm_probability=self.config.loss.mlm_probability,
                )
            )
            out.update(gate_values(model))
        return out

    # ------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the model in the saved format of :mod:`fiber_models` (``config.json``, ``model.safetensors``,
        the tokenizer), with the task name and resolved config as provenance."""
        assert isinstance(model, CoarseModel)
        info = {"task": self.name, "config": to_dict(self.config)}
        save_coarse_family(model, out_dir, self.config, tokenizer=self.tokenizer_file(), info=info)


def fabric_gather(fabric: Any) -> GatherFn:
    """All-gather through Fabric, ``[B, ...] -> [W * B, ...]`` in rank order, with gradient for float tensors."""

    def gather(x: Tensor) -> Tensor:
        out = fabric.all_gather(x, sync_grads=bool(x.is_floating_point() and x.requires_grad))
        return out.reshape(-1, *x.shape[1:])

    return gather


def load_pretrained_into(model: CoarseModel, path: Path) -> list[str]:
    """Initialise from a saved model (an exported run, a converted official checkpoint, either format) or a
    backbone ``save_pretrained`` directory (:func:`fiber_models.initialize_from`).

    The backbone must fit exactly. Head weights present in the checkpoint are loaded; heads it lacks (e.g.
    the ITM/MLM heads of a converted VQA checkpoint) keep their fresh initialisation.

    Returns:
        The model keys that were initialised fresh (also printed).

    Raises:
        WeightsMismatchError: backbone tensors are missing, unexpected or of another shape (named).
    """
    report = initialize_from(model, path)
    bad = [k for k in [*report.fresh, *report.unused, *report.shape_mismatch] if k.startswith("backbone.")]
    if bad:
        shown = abbreviate_keys(bad, limit=10)
        raise WeightsMismatchError(f"{path}: the backbone does not fit this model ({len(bad)} tensors): {shown}")
    fresh = report.fresh
    if fresh:
        log.info(f"initialised fresh (not in {path}): {', '.join(fresh)}")
    return fresh


@torch.no_grad()
def _encode_eval_split(
    model: CoarseModel, data: DataConfig, tokenizer: Any, transform: ImageTransform, *, device: Any, batch_size: int
) -> tuple[Any, Tensor, Tensor]:
    """The eval split's corpus and its ITC image-text scores ``[N_img, N_txt]`` (fp32, on the CPU), plus the
    tokenised captions ``(input_ids, attention_mask)`` stacked as a ``[2, N_txt, L]`` long tensor."""
    ann, images = _dataset_paths(data, data.eval_split)
    corpus = load_retrieval_corpus(ann, images)
    image_loader = DataLoader(corpus.image_dataset(transform), batch_size=batch_size, num_workers=data.num_workers)
    image_emb = torch.cat([model.embed_images(pix.to(device)).float() for pix, _ in image_loader])
    text_emb, ids, masks = [], [], []
    for start in range(0, len(corpus.texts), batch_size):
        texts = list(corpus.texts[start : start + batch_size])
        enc = tokenizer(texts, max_length=data.max_text_len)  # ITC on batch-padded text, as before
        padded = tokenizer(texts, max_length=data.max_text_len, padding="max_length")  # one width to stack
        ids.append(padded.input_ids.long())
        masks.append(padded.attention_mask.long())
        text = TextInputs(enc.input_ids.to(device), enc.attention_mask.to(device))
        text_emb.append(model.embed_texts(text).float())
    with torch.autocast(image_emb.device.type, enabled=False):  # similarities in fp32 even under bf16-mixed
        scores = (image_emb.float() @ torch.cat(text_emb).float().t()).cpu()
    return corpus, scores, torch.stack([torch.cat(ids), torch.cat(masks)])


def retrieval_metrics(
    model: CoarseModel,
    data: DataConfig,
    tokenizer: Any,
    transform: ImageTransform,
    *,
    device: Any,
    batch_size: int = 64,
) -> dict[str, float]:
    """Encode every image and caption of ``data.eval_split`` once and score all pairs by ITC cosine similarity."""
    corpus, scores, _ = _encode_eval_split(model, data, tokenizer, transform, device=device, batch_size=batch_size)
    metrics = recall_at_k(scores.numpy(), np.asarray(corpus.text_to_image))
    metrics["num_images"] = float(scores.shape[0])
    metrics["num_texts"] = float(scores.shape[1])
    return metrics


def hardest_negatives(scores: Tensor, text_to_image: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """The held-out ITM negatives of :func:`fusion_metrics`: for image ``i < n`` (``n = len(query)``) the most
    ITC-similar caption of another image, and for its query caption ``query[i]`` the most similar other image.

    Args:
        scores: ``[N_img, N_txt]`` ITC scores.
        text_to_image: ``LongTensor [N_txt]``, the image row of every caption.
        query: ``LongTensor [n]``, the query caption of each of the first ``n`` images.

    Returns:
        ``(text_neg [n], image_neg [n])``: caption and image rows.
    """
    n = len(query)
    rows = torch.arange(n)
    i2t = scores[:n].clone()
    i2t[text_to_image[None, :] == rows[:, None]] = float("-inf")  # captions of the same image excluded
    t2i = scores[:, query].t().clone()  # [n, N_img]
    t2i[rows, rows] = float("-inf")
    return i2t.argmax(1), t2i.argmax(1)


@torch.no_grad()
def fusion_metrics(
    model: CoarseModel,
    data: DataConfig,
    tokenizer: Any,
    transform: ImageTransform,
    *,
    device: Any,
    batch_size: int = 64,
    max_queries: int = 200,
    rerank_k: int = 8,
    mlm_probability: float = 0.15,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out proof that the *fused* path learned: ITM, ITM re-ranking and image-conditioned MLM.

    On the first ``max_queries`` images of ``data.eval_split`` (one query caption each: the image's first one):

    - ``itm/acc`` on 1 positive : 2 hard negatives per image, the negatives chosen by the ITC scores (the
      most similar wrong caption for the image, the most similar wrong image for the caption), beside
      ``itm/prior`` = 2/3 (always answering "no match");
    - ``t2i_itc/R@1``: text->image R@1 of ITC alone over the whole gallery for those queries, and
      ``t2i_rerank/R@1``: the ITC top-``rerank_k`` images re-ordered by the ITM match logit;
    - ``mlm/acc`` on held-out masked tokens (seeded BERT masking of the query captions, fused with their
      image), beside ``mlm/unigram_acc``: always predicting the most frequent token of those same captions
      (an oracle unigram baseline, as strong as any unigram guess can be).

    Returns:
        The metrics above (percentages for R@1, fractions for accuracies) and ``fusion/num_queries``.
    """
    corpus, scores, tokens = _encode_eval_split(model, data, tokenizer, transform, device=device, batch_size=batch_size)
    t2i = torch.as_tensor(np.asarray(corpus.text_to_image))
    n = min(max_queries, scores.shape[0])
    query = torch.tensor([int(rows[0]) for rows in corpus.image_to_texts()[:n]])  # first caption of image i
    images = corpus.image_dataset(transform)
    pix_cache: dict[int, Tensor] = {}

    def pixels(rows: Tensor) -> Tensor:
        for r in rows.tolist():
            if r not in pix_cache:
                pix_cache[r] = images[r][0]
        return torch.stack([pix_cache[r] for r in rows.tolist()]).to(device)

    def itm_logits(image_rows: Tensor, text_rows: Tensor) -> Tensor:
        out = []
        for a in range(0, len(image_rows), batch_size):
            i, t = image_rows[a : a + batch_size], text_rows[a : a + batch_size]
            text = TextInputs(tokens[0, t].to(device), tokens[1, t].bool().to(device))
            fused = model.backbone(pixels(i), text, fuse=True)
            out.append(model.itm_score.logits(model.projection(fused).cls).float().cpu())
        return torch.cat(out)

    rows = torch.arange(n)
    text_neg, image_neg = hardest_negatives(scores, t2i, query)
    logits = itm_logits(torch.cat([rows, rows, image_neg]), torch.cat([query, text_neg, query]))
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long()
    metrics = {
        "itm/acc": float((logits.argmax(1) == labels).float().mean()),
        "itm/prior": 2.0 / 3.0,
        "fusion/num_queries": float(n),
    }
    # ITC top-k re-ranked by the ITM match logit
    k = min(rerank_k, scores.shape[0])
    ranked = scores[:, query].t().topk(k, dim=1).indices  # [n, k]
    match = itm_logits(ranked.reshape(-1), query.repeat_interleave(k))[:, 1].view(n, k)
    metrics["t2i_itc/R@1"] = 100.0 * float((ranked[:, 0] == rows).float().mean())
    metrics["t2i_rerank/R@1"] = 100.0 * float((ranked[rows, match.argmax(1)] == rows).float().mean())
    # MLM on the query captions with their own image
    ids, mask = tokens[0, query], tokens[1, query].bool()
    specials = sorted(ImageTextCollator(tokenizer, max_length=data.max_text_len).special_ids)
    gen = torch.Generator().manual_seed(seed)
    masked, labels_mlm = mask_tokens(
        ids,
        mask,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=tokenizer.vocab_size,
        special_ids=specials,
        probability=mlm_probability,
        generator=gen,
    )
    correct = total = 0
    for a in range(0, n, batch_size):
        sl = slice(a, a + batch_size)
        fused = model.backbone(pixels(rows[sl]), TextInputs(masked[sl].to(device), mask[sl].to(device)), fuse=True)
        pred = model.mlm_score.logits(model.projection(fused).text_feats).argmax(-1).cpu()
        sel = labels_mlm[sl] != -100
        correct += int((pred[sel] == labels_mlm[sl][sel]).sum())
        total += int(sel.sum())
    real = ids[mask & ~torch.isin(ids, torch.tensor(specials))]
    top = int(torch.bincount(real).argmax()) if real.numel() else -1
    sel = labels_mlm != -100
    metrics["mlm/acc"] = correct / max(total, 1)
    metrics["mlm/unigram_acc"] = float((labels_mlm[sel] == top).float().mean()) if total else 0.0
    metrics["mlm/num_masked"] = float(total)
    return metrics
