"""fiber-data: datasets, tokenisation, transforms and a synthetic world for FIBER.

Depends on torch, numpy and pillow only; Hugging Face tokenizers (``[hf]``) and Arrow tables (``[arrow]``) are
optional extras imported lazily, when first used.

Coarse stage: :class:`CocoCaptionsDataset` / :class:`KarpathyCaptionsDataset` / :class:`ArrowCaptionDataset` /
:class:`TarImageTextDataset` + :class:`ImageTextCollator`. Fine stage: :class:`MdetrGroundingDataset` /
:class:`DetectionGroundingDataset` / :class:`TSVDetectionDataset` + :class:`GroundingCollator`. Downstream: :class:`VQAv2Dataset`,
:class:`NLVR2Dataset`, :class:`ArrowVQADataset`, :class:`ArrowNLVR2Dataset`, :func:`load_retrieval_corpus`;
Flickr30k Entities raw files: :class:`FlickrEntitiesDataset`. Augmentation: :class:`CoarseTrainTransform`
(coarse fine-tuning), :class:`GroundingTransform` (fine stage). Error policy: :class:`SkipBadSamples`.
Tests and smoke runs: :func:`generate_world`.

Layout: :mod:`fiber_data.sources` (one module per dataset family), :mod:`fiber_data.formats` (Arrow, TSV, tar
shards, streaming), :mod:`fiber_data.text` (tokenisers, MLM masking, character spans → tokens),
:mod:`fiber_data.images` (decoding, transforms, augmentation), :mod:`fiber_data.synthetic` (the synthetic world);
cross-cutting modules at the top. The module paths of the earlier flat layout (``fiber_data.vqa``,
``fiber_data.tokenization``, ...) resolve through :data:`_OLD_MODULES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_data._lazy import ModuleAliases, lazy_exports
from fiber_data._version import __version__ as __version__

if TYPE_CHECKING:  # the names below are imported on first access (``fiber-data --help`` loads no torch)
    from fiber_data.boxes import xywh_to_xyxy_plus1
    from fiber_data.collate import ImageTextCollator
    from fiber_data.errors import AnnotationError, DataError, ImageLoadError, MissingExtraError, TokenizerError
    from fiber_data.formats.arrow import ArrowCaptionDataset, karpathy_to_arrow, read_arrow_table, write_caption_table
    from fiber_data.formats.tar import TarImageTextDataset, expand_shards, iter_tar_samples, write_tar_shards
    from fiber_data.formats.tsv import TSVDetectionDataset
    from fiber_data.images.augment import CoarseTrainTransform, RandAugment, crop_boxes, pad_boxes
    from fiber_data.images.transforms import (
        BGR255_MEAN,
        BGR255_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        GroundingTransform,
        ImageTransform,
        load_image,
        load_image_bytes,
    )
    from fiber_data.prompts import (
        DetectionPromptSampler,
        Prompt,
        build_prompt,
        chunk_prompts,
        clean_class_name,
        token_counter,
    )
    from fiber_data.robust import SkipBadSamples
    from fiber_data.sources.cc_sbu import read_annot_pairs
    from fiber_data.sources.coco_captions import (
        CaptionTable,
        CocoCaptionsDataset,
        ImageFolderDataset,
        ImageTextDataset,
        KarpathyCaptionsDataset,
        RetrievalCorpus,
        load_retrieval_corpus,
        read_coco_captions,
        read_karpathy,
    )
    from fiber_data.sources.concat import ConcatImageTextDataset
    from fiber_data.sources.detection import DetectionGroundingDataset
    from fiber_data.sources.flickr_entities import FlickrEntitiesDataset, read_flickr_entities, write_flickr_mdetr_json
    from fiber_data.sources.grounding import AspectRatioBatchSampler, GroundingCollator, MdetrGroundingDataset
    from fiber_data.sources.nlvr2 import ArrowNLVR2Dataset, NLVR2Collator, NLVR2Dataset, write_nlvr2_table
    from fiber_data.sources.visual_genome import read_visual_genome
    from fiber_data.sources.vqa import (
        AnswerVocab,
        ArrowVQADataset,
        VQACollator,
        VQAv2Dataset,
        answer_scores,
        build_answer_vocab,
        normalize_word,
        write_vqa_table,
    )
    from fiber_data.stats import dataset_stats
    from fiber_data.synthetic.config import SYNTHETIC_VQA_TEMPLATE, SyntheticWorldConfig
    from fiber_data.synthetic.world import generate_world, load_world_manifest
    from fiber_data.text.left_right import flip_caption
    from fiber_data.text.masking import mask_tokens
    from fiber_data.text.spans import positive_map_from_spans
    from fiber_data.text.tokenizer import ByteBPETokenizer, HFTokenizer, load_tokenizer
    from fiber_data.types import (
        EmptyBatch,
        Encoding,
        GroundingBatch,
        GroundingSample,
        GroundingTarget,
        ImageTextBatch,
        ImageTextSample,
        NLVR2Batch,
        NLVR2Sample,
        SkippedSample,
        Tokenizer,
        VQABatch,
        VQASample,
    )
    from fiber_data.verify import VerifyReport, verify_annotations

__all__ = [
    "BGR255_MEAN",
    "BGR255_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_VQA_TEMPLATE",
    "AnnotationError",
    "AnswerVocab",
    "ArrowCaptionDataset",
    "ArrowNLVR2Dataset",
    "ArrowVQADataset",
    "FlickrEntitiesDataset",
    "dataset_stats",
    "read_flickr_entities",
    "write_flickr_mdetr_json",
    "write_nlvr2_table",
    "write_vqa_table",
    "AspectRatioBatchSampler",
    "ByteBPETokenizer",
    "CoarseTrainTransform",
    "EmptyBatch",
    "RandAugment",
    "SkipBadSamples",
    "SkippedSample",
    "crop_boxes",
    "flip_caption",
    "pad_boxes",
    "CaptionTable",
    "CocoCaptionsDataset",
    "ConcatImageTextDataset",
    "DataError",
    "DetectionGroundingDataset",
    "DetectionPromptSampler",
    "Encoding",
    "GroundingBatch",
    "GroundingCollator",
    "GroundingSample",
    "GroundingTarget",
    "GroundingTransform",
    "HFTokenizer",
    "ImageFolderDataset",
    "ImageLoadError",
    "ImageTextBatch",
    "ImageTextCollator",
    "ImageTextDataset",
    "ImageTextSample",
    "ImageTransform",
    "KarpathyCaptionsDataset",
    "MdetrGroundingDataset",
    "MissingExtraError",
    "NLVR2Batch",
    "NLVR2Collator",
    "NLVR2Dataset",
    "NLVR2Sample",
    "Prompt",
    "RetrievalCorpus",
    "SyntheticWorldConfig",
    "TSVDetectionDataset",
    "TarImageTextDataset",
    "TokenizerError",
    "Tokenizer",
    "VQABatch",
    "VQACollator",
    "VQASample",
    "VQAv2Dataset",
    "VerifyReport",
    "answer_scores",
    "build_answer_vocab",
    "build_prompt",
    "chunk_prompts",
    "clean_class_name",
    "expand_shards",
    "generate_world",
    "iter_tar_samples",
    "karpathy_to_arrow",
    "load_image",
    "load_image_bytes",
    "load_retrieval_corpus",
    "load_tokenizer",
    "load_world_manifest",
    "mask_tokens",
    "normalize_word",
    "positive_map_from_spans",
    "read_annot_pairs",
    "read_arrow_table",
    "read_coco_captions",
    "read_karpathy",
    "read_visual_genome",
    "token_counter",
    "verify_annotations",
    "write_caption_table",
    "write_tar_shards",
    "xywh_to_xyxy_plus1",
]

_LAZY: dict[str, str] = {
    "AnnotationError": "fiber_data.errors",
    "AnswerVocab": "fiber_data.sources.vqa",
    "ArrowCaptionDataset": "fiber_data.formats.arrow",
    "ArrowNLVR2Dataset": "fiber_data.sources.nlvr2",
    "ArrowVQADataset": "fiber_data.sources.vqa",
    "AspectRatioBatchSampler": "fiber_data.sources.grounding",
    "BGR255_MEAN": "fiber_data.images.transforms",
    "BGR255_STD": "fiber_data.images.transforms",
    "ByteBPETokenizer": "fiber_data.text.tokenizer",
    "CaptionTable": "fiber_data.sources.coco_captions",
    "CoarseTrainTransform": "fiber_data.images.augment",
    "CocoCaptionsDataset": "fiber_data.sources.coco_captions",
    "ConcatImageTextDataset": "fiber_data.sources.concat",
    "DataError": "fiber_data.errors",
    "DetectionGroundingDataset": "fiber_data.sources.detection",
    "DetectionPromptSampler": "fiber_data.prompts",
    "EmptyBatch": "fiber_data.types",
    "Encoding": "fiber_data.types",
    "FlickrEntitiesDataset": "fiber_data.sources.flickr_entities",
    "GroundingBatch": "fiber_data.types",
    "GroundingCollator": "fiber_data.sources.grounding",
    "GroundingSample": "fiber_data.types",
    "GroundingTarget": "fiber_data.types",
    "GroundingTransform": "fiber_data.images.transforms",
    "HFTokenizer": "fiber_data.text.tokenizer",
    "IMAGENET_MEAN": "fiber_data.images.transforms",
    "IMAGENET_STD": "fiber_data.images.transforms",
    "ImageFolderDataset": "fiber_data.sources.coco_captions",
    "ImageLoadError": "fiber_data.errors",
    "ImageTextBatch": "fiber_data.types",
    "ImageTextCollator": "fiber_data.collate",
    "ImageTextDataset": "fiber_data.sources.coco_captions",
    "ImageTextSample": "fiber_data.types",
    "ImageTransform": "fiber_data.images.transforms",
    "KarpathyCaptionsDataset": "fiber_data.sources.coco_captions",
    "MdetrGroundingDataset": "fiber_data.sources.grounding",
    "MissingExtraError": "fiber_data.errors",
    "NLVR2Batch": "fiber_data.types",
    "NLVR2Collator": "fiber_data.sources.nlvr2",
    "NLVR2Dataset": "fiber_data.sources.nlvr2",
    "NLVR2Sample": "fiber_data.types",
    "Prompt": "fiber_data.prompts",
    "RandAugment": "fiber_data.images.augment",
    "RetrievalCorpus": "fiber_data.sources.coco_captions",
    "SYNTHETIC_VQA_TEMPLATE": "fiber_data.synthetic.config",
    "SkipBadSamples": "fiber_data.robust",
    "SkippedSample": "fiber_data.types",
    "SyntheticWorldConfig": "fiber_data.synthetic.config",
    "TSVDetectionDataset": "fiber_data.formats.tsv",
    "TarImageTextDataset": "fiber_data.formats.tar",
    "Tokenizer": "fiber_data.types",
    "TokenizerError": "fiber_data.errors",
    "VQABatch": "fiber_data.types",
    "VQACollator": "fiber_data.sources.vqa",
    "VQASample": "fiber_data.types",
    "VQAv2Dataset": "fiber_data.sources.vqa",
    "VerifyReport": "fiber_data.verify",
    "answer_scores": "fiber_data.sources.vqa",
    "build_answer_vocab": "fiber_data.sources.vqa",
    "build_prompt": "fiber_data.prompts",
    "chunk_prompts": "fiber_data.prompts",
    "clean_class_name": "fiber_data.prompts",
    "crop_boxes": "fiber_data.images.augment",
    "dataset_stats": "fiber_data.stats",
    "expand_shards": "fiber_data.formats.tar",
    "flip_caption": "fiber_data.text.left_right",
    "generate_world": "fiber_data.synthetic.world",
    "iter_tar_samples": "fiber_data.formats.tar",
    "karpathy_to_arrow": "fiber_data.formats.arrow",
    "load_image": "fiber_data.images.transforms",
    "load_image_bytes": "fiber_data.images.transforms",
    "load_retrieval_corpus": "fiber_data.sources.coco_captions",
    "load_tokenizer": "fiber_data.text.tokenizer",
    "load_world_manifest": "fiber_data.synthetic.world",
    "mask_tokens": "fiber_data.text.masking",
    "normalize_word": "fiber_data.sources.vqa",
    "pad_boxes": "fiber_data.images.augment",
    "positive_map_from_spans": "fiber_data.text.spans",
    "read_annot_pairs": "fiber_data.sources.cc_sbu",
    "read_arrow_table": "fiber_data.formats.arrow",
    "read_coco_captions": "fiber_data.sources.coco_captions",
    "read_flickr_entities": "fiber_data.sources.flickr_entities",
    "read_karpathy": "fiber_data.sources.coco_captions",
    "read_visual_genome": "fiber_data.sources.visual_genome",
    "token_counter": "fiber_data.prompts",
    "verify_annotations": "fiber_data.verify",
    "write_caption_table": "fiber_data.formats.arrow",
    "write_flickr_mdetr_json": "fiber_data.sources.flickr_entities",
    "write_nlvr2_table": "fiber_data.sources.nlvr2",
    "write_tar_shards": "fiber_data.formats.tar",
    "write_vqa_table": "fiber_data.sources.vqa",
    "xywh_to_xyxy_plus1": "fiber_data.boxes",
}

#: Module paths of the flat layout (before issue 22) → the module(s) holding their names now; importing an old
#: path gives that module (or, for a module that was split, a view looking names up in its parts in order).
#: ``fiber_data.sources`` and ``fiber_data.synthetic`` are packages now and export the old names themselves.
_OLD_MODULES: dict[str, tuple[str, ...]] = {
    "fiber_data.arrow": ("fiber_data.formats.arrow",),
    "fiber_data.arrow_tasks": ("fiber_data.sources.vqa", "fiber_data.sources.nlvr2"),
    "fiber_data.augment": ("fiber_data.images.augment", "fiber_data.text.left_right"),
    "fiber_data.coco_captions": ("fiber_data.sources.coco_captions",),
    "fiber_data.detection": ("fiber_data.sources.detection", "fiber_data.boxes"),
    "fiber_data.flickr_entities": ("fiber_data.sources.flickr_entities",),
    "fiber_data.grounding": ("fiber_data.sources.grounding", "fiber_data.boxes"),
    "fiber_data.nlvr2": ("fiber_data.sources.nlvr2",),
    "fiber_data.streaming": ("fiber_data.formats.streaming",),
    "fiber_data.tokenization": ("fiber_data.text.tokenizer", "fiber_data.text.masking", "fiber_data.text.spans"),
    "fiber_data.transforms": ("fiber_data.images.transforms",),
    "fiber_data.tsv": ("fiber_data.formats.tsv",),
    "fiber_data.tv_decode": ("fiber_data.images.tv_decode",),
    "fiber_data.vqa": ("fiber_data.sources.vqa",),
    "fiber_data.webdataset": ("fiber_data.formats.tar",),
}
ModuleAliases(_OLD_MODULES).install()
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
