"""Coarse-grained pre-training: ITC + ITM with hard negatives + MLM (training.md §1).

Per micro-batch of ``B`` pairs, as the reference:

1. MLM: a fused forward on the masked captions; the MLM head reads the projected text tokens.
2. ITC: image-only and text-only forwards (fusion off); contrastive loss with learnable temperature.
3. ITM: a fused forward on ``3B`` pairs, one hard-negative caption per image and one hard-negative image per
   caption drawn from the ITC similarities.

Hard negatives are drawn from the local micro-batch (``B`` candidates). With the ITC queue enabled the
reference also draws from queued entries; that needs the queued inputs re-fetched and is not implemented
here yet (the queue still enters the ITC loss).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fiber_backbones import TextInputs, WeightsMismatchError
from fiber_data import (
    CocoCaptionsDataset,
    ImageTextBatch,
    ImageTextCollator,
    ImageTransform,
    SkipBadSamples,
    SyntheticWorldConfig,
    generate_world,
    load_retrieval_corpus,
    load_tokenizer,
)
from fiber_eval.retrieval import recall_at_k
from fiber_heads import (
    GatherFn,
)
from fiber_models.coarse import CoarseModel as CoarseModel
from fiber_models.pretrained import Preprocessing, initialize_from
from fiber_train.config import CoarseConfig, DataConfig, to_dict
from fiber_train.data_sources import TrainData, WeightedMixtureSampler, build_train_data
from fiber_train.optim import build_param_groups
from fiber_train.tasks.base import Fabricish, build_backbone, missing_tokenizer_message

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


class CoarsePretrainTask:
    """``fiber-train coarse``: the coarse pre-training task (see :class:`fiber_train.tasks.base.TrainTask`)."""

    name = "coarse"

    def __init__(self, config: CoarseConfig) -> None:
        self.config = config
        self._tokenizer: Any = None
        self._fabric: Any = None
        self._model: CoarseModel | None = None
        self._train_data: TrainData | None = None
        self._skipped_records: dict[str, int] = {}

    def attach_fabric(self, fabric: Any) -> None:
        """Called by the loop before :meth:`build_model`: the ITC head gathers through this Fabric."""
        self._fabric = fabric

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
        root = Path(data.root)
        if data.format == "synthetic":
            generate_world(
                root,
                config=SyntheticWorldConfig(
                    seed=data.seed,
                    image_size=data.image_size,
                    num_train=data.synthetic_train,
                    num_val=data.synthetic_val,
                    num_test=data.synthetic_test,
                ),
                progress=self.config.trainer.progress,
            )
        elif data.format != "coco-captions":
            raise ValueError(f"data.format must be 'synthetic' or 'coco-captions', got {data.format!r}")
        for split in (data.eval_split,) if data.sources else dict.fromkeys((data.train_split, data.eval_split)):
            for path in _dataset_paths(data, split):
                if not path.exists():
                    raise FileNotFoundError(_missing_data_message(data, path))
        tok_path = self.tokenizer_path()
        if not data.tokenizer and not tok_path.exists():
            raise FileNotFoundError(missing_tokenizer_message(tok_path))

    def tokenizer_path(self) -> Path:
        data = self.config.data
        return Path(data.tokenizer) if data.tokenizer else Path(data.root) / "tokenizer.json"

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            data = self.config.data
            self._tokenizer = load_tokenizer(data.tokenizer or self.tokenizer_path())
        return self._tokenizer

    def image_transform(self) -> ImageTransform:
        if self.config.data.image_decoder == "torchvision":
            from fiber_data.tv_decode import TorchvisionImageTransform

            return TorchvisionImageTransform(self.config.data.image_size)
        return ImageTransform(self.config.data.image_size)

    def train_dataset(self) -> Dataset:
        data = self.config.data
        if data.sources:
            rank, world = (0, 1) if self._fabric is None else (self._fabric.global_rank, self._fabric.world_size)
            self._train_data = build_train_data(
                data.sources,
                self.image_transform(),
                seed=self.config.trainer.seed,
                rank=rank,
                world_size=world,
                on_error=data.on_error,
            )
            if isinstance(self._train_data.dataset, IterableDataset):
                return self._train_data.dataset  # streams apply data.on_error themselves (build_train_data)
            return SkipBadSamples(self._train_data.dataset, policy=data.on_error, name="sources")
        ann, images = _dataset_paths(data, data.train_split)
        dataset = CocoCaptionsDataset(ann, images, transform=self.image_transform(), on_error=data.on_error)  # type: ignore[arg-type]
        self._skipped_records = {data.train_split: len(dataset.table.skipped_records)}
        return SkipBadSamples(dataset, policy=data.on_error, name=data.train_split)

    def data_report(self) -> dict[str, int]:
        """Caption records the training loader left out as bad (``data.on_error=skip``), as
        ``{"<split>/caption_records_skipped": count}`` (non-zero only); the trainer logs it."""
        return {f"{k}/caption_records_skipped": n for k, n in self._skipped_records.items() if n}

    def train_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> Any:
        """A weighted mixture sampler when ``data.sources`` carry weights; ``None`` (uniform) otherwise."""
        if self._train_data is None or not self._train_data.weights:
            return None
        return WeightedMixtureSampler(self._train_data.sizes, self._train_data.weights, seed, rank, world_size)

    def collate_fn(self) -> Callable[[list[Any]], ImageTextBatch]:
        return ImageTextCollator(
            self.tokenizer,
            max_length=self.config.data.max_text_len,
            mlm_probability=self.config.loss.mlm_probability if self.config.loss.mlm > 0 else 0.0,
        )

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> CoarseModel:
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
            gather=fabric_gather(self._fabric) if self._fabric is not None and self._fabric.world_size > 1 else None,
            rank=0 if self._fabric is None else self._fabric.global_rank,
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
        """Zero-shot image-text retrieval (ITC dual encoder) on ``data.eval_split``: R@1/5/10 both ways."""
        if not self.config.eval.retrieval:
            return {}
        assert isinstance(model, CoarseModel)
        return retrieval_metrics(
            model,
            self.config.data,
            self.tokenizer,
            self.image_transform(),
            device=fabric.device,
            batch_size=self.config.eval.batch_size,
        )

    # ------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the model in the saved format of :mod:`fiber_models` (``config.json``, ``model.safetensors``,
        the tokenizer), with the task name and resolved config as provenance."""
        assert isinstance(model, CoarseModel)
        tok_src = self.tokenizer_path()
        data = self.config.data
        model.save_pretrained(
            out_dir,
            tokenizer=tok_src if tok_src.is_file() else None,
            preprocessing=Preprocessing.for_backbone(
                self.config.model.backbone,
                image_size=data.image_size,
                max_text_len=data.max_text_len,
                text_pool=self.config.model.text_pool,
            ),
            info={"task": self.name, "config": to_dict(self.config)},
        )


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
        shown = ", ".join(bad[:10]) + (f", ... (+{len(bad) - 10})" if len(bad) > 10 else "")
        raise WeightsMismatchError(f"{path}: the backbone does not fit this model ({len(bad)} tensors): {shown}")
    fresh = report.fresh
    if fresh:
        log.info(f"initialised fresh (not in {path}): {', '.join(fresh)}")
    return fresh


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
    ann, images = _dataset_paths(data, data.eval_split)
    corpus = load_retrieval_corpus(ann, images)
    image_loader = DataLoader(corpus.image_dataset(transform), batch_size=batch_size, num_workers=data.num_workers)
    image_emb = torch.cat([model.embed_images(pix.to(device)).float() for pix, _ in image_loader])
    text_emb = []
    for start in range(0, len(corpus.texts), batch_size):
        enc = tokenizer(list(corpus.texts[start : start + batch_size]), max_length=data.max_text_len)
        text = TextInputs(enc.input_ids.to(device), enc.attention_mask.to(device))
        text_emb.append(model.embed_texts(text).float())
    with torch.autocast(image_emb.device.type, enabled=False):  # similarities in fp32 even under bf16-mixed
        scores = (image_emb.float() @ torch.cat(text_emb).float().t()).cpu().numpy()
    metrics = recall_at_k(scores, np.asarray(corpus.text_to_image))
    metrics["num_images"] = float(scores.shape[0])
    metrics["num_texts"] = float(scores.shape[1])
    return metrics
