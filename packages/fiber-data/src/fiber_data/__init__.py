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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fiber_data._lazy import lazy_getattr
from fiber_data._version import __version__ as __version__

if TYPE_CHECKING:  # the names below are imported on first access (``fiber-data --help`` loads no torch)
    from fiber_data.arrow import ArrowCaptionDataset, karpathy_to_arrow, read_arrow_table, write_caption_table
    from fiber_data.arrow_tasks import ArrowNLVR2Dataset, ArrowVQADataset, write_nlvr2_table, write_vqa_table
    from fiber_data.augment import CoarseTrainTransform, RandAugment, crop_boxes, flip_caption, pad_boxes
    from fiber_data.coco_captions import (
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
    from fiber_data.collate import ImageTextCollator
    from fiber_data.detection import DetectionGroundingDataset
    from fiber_data.errors import AnnotationError, DataError, ImageLoadError, MissingExtraError, TokenizerError
    from fiber_data.flickr_entities import FlickrEntitiesDataset, read_flickr_entities, write_flickr_mdetr_json
    from fiber_data.grounding import (
        AspectRatioBatchSampler,
        GroundingCollator,
        MdetrGroundingDataset,
        xywh_to_xyxy_plus1,
    )
    from fiber_data.nlvr2 import NLVR2Collator, NLVR2Dataset
    from fiber_data.prompts import (
        DetectionPromptSampler,
        Prompt,
        build_prompt,
        chunk_prompts,
        clean_class_name,
        token_counter,
    )
    from fiber_data.robust import SkipBadSamples
    from fiber_data.sources import ConcatImageTextDataset, read_annot_pairs, read_visual_genome
    from fiber_data.stats import dataset_stats
    from fiber_data.synthetic import SYNTHETIC_VQA_TEMPLATE, SyntheticWorldConfig, generate_world, load_world_manifest
    from fiber_data.tokenization import (
        ByteBPETokenizer,
        HFTokenizer,
        load_tokenizer,
        mask_tokens,
        positive_map_from_spans,
    )
    from fiber_data.transforms import (
        BGR255_MEAN,
        BGR255_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        GroundingTransform,
        ImageTransform,
        load_image,
        load_image_bytes,
    )
    from fiber_data.tsv import TSVDetectionDataset
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
    from fiber_data.vqa import AnswerVocab, VQACollator, VQAv2Dataset, answer_scores, build_answer_vocab, normalize_word
    from fiber_data.webdataset import TarImageTextDataset, expand_shards, iter_tar_samples, write_tar_shards

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
    "AnswerVocab": "fiber_data.vqa",
    "ArrowCaptionDataset": "fiber_data.arrow",
    "ArrowNLVR2Dataset": "fiber_data.arrow_tasks",
    "ArrowVQADataset": "fiber_data.arrow_tasks",
    "AspectRatioBatchSampler": "fiber_data.grounding",
    "BGR255_MEAN": "fiber_data.transforms",
    "BGR255_STD": "fiber_data.transforms",
    "ByteBPETokenizer": "fiber_data.tokenization",
    "CaptionTable": "fiber_data.coco_captions",
    "CoarseTrainTransform": "fiber_data.augment",
    "CocoCaptionsDataset": "fiber_data.coco_captions",
    "ConcatImageTextDataset": "fiber_data.sources",
    "DataError": "fiber_data.errors",
    "DetectionGroundingDataset": "fiber_data.detection",
    "DetectionPromptSampler": "fiber_data.prompts",
    "EmptyBatch": "fiber_data.types",
    "Encoding": "fiber_data.types",
    "FlickrEntitiesDataset": "fiber_data.flickr_entities",
    "GroundingBatch": "fiber_data.types",
    "GroundingCollator": "fiber_data.grounding",
    "GroundingSample": "fiber_data.types",
    "GroundingTarget": "fiber_data.types",
    "GroundingTransform": "fiber_data.transforms",
    "HFTokenizer": "fiber_data.tokenization",
    "IMAGENET_MEAN": "fiber_data.transforms",
    "IMAGENET_STD": "fiber_data.transforms",
    "ImageFolderDataset": "fiber_data.coco_captions",
    "ImageLoadError": "fiber_data.errors",
    "TokenizerError": "fiber_data.errors",
    "ImageTextBatch": "fiber_data.types",
    "ImageTextCollator": "fiber_data.collate",
    "ImageTextDataset": "fiber_data.coco_captions",
    "ImageTextSample": "fiber_data.types",
    "ImageTransform": "fiber_data.transforms",
    "KarpathyCaptionsDataset": "fiber_data.coco_captions",
    "MdetrGroundingDataset": "fiber_data.grounding",
    "MissingExtraError": "fiber_data.errors",
    "NLVR2Batch": "fiber_data.types",
    "NLVR2Collator": "fiber_data.nlvr2",
    "NLVR2Dataset": "fiber_data.nlvr2",
    "NLVR2Sample": "fiber_data.types",
    "Prompt": "fiber_data.prompts",
    "RandAugment": "fiber_data.augment",
    "RetrievalCorpus": "fiber_data.coco_captions",
    "SYNTHETIC_VQA_TEMPLATE": "fiber_data.synthetic",
    "SkipBadSamples": "fiber_data.robust",
    "SkippedSample": "fiber_data.types",
    "SyntheticWorldConfig": "fiber_data.synthetic",
    "TSVDetectionDataset": "fiber_data.tsv",
    "TarImageTextDataset": "fiber_data.webdataset",
    "Tokenizer": "fiber_data.types",
    "VQABatch": "fiber_data.types",
    "VQACollator": "fiber_data.vqa",
    "VQASample": "fiber_data.types",
    "VQAv2Dataset": "fiber_data.vqa",
    "VerifyReport": "fiber_data.verify",
    "answer_scores": "fiber_data.vqa",
    "build_answer_vocab": "fiber_data.vqa",
    "build_prompt": "fiber_data.prompts",
    "chunk_prompts": "fiber_data.prompts",
    "clean_class_name": "fiber_data.prompts",
    "crop_boxes": "fiber_data.augment",
    "dataset_stats": "fiber_data.stats",
    "expand_shards": "fiber_data.webdataset",
    "flip_caption": "fiber_data.augment",
    "generate_world": "fiber_data.synthetic",
    "iter_tar_samples": "fiber_data.webdataset",
    "karpathy_to_arrow": "fiber_data.arrow",
    "load_image": "fiber_data.transforms",
    "load_image_bytes": "fiber_data.transforms",
    "load_retrieval_corpus": "fiber_data.coco_captions",
    "load_tokenizer": "fiber_data.tokenization",
    "load_world_manifest": "fiber_data.synthetic",
    "mask_tokens": "fiber_data.tokenization",
    "normalize_word": "fiber_data.vqa",
    "pad_boxes": "fiber_data.augment",
    "positive_map_from_spans": "fiber_data.tokenization",
    "read_annot_pairs": "fiber_data.sources",
    "read_arrow_table": "fiber_data.arrow",
    "read_coco_captions": "fiber_data.coco_captions",
    "read_flickr_entities": "fiber_data.flickr_entities",
    "read_karpathy": "fiber_data.coco_captions",
    "read_visual_genome": "fiber_data.sources",
    "token_counter": "fiber_data.prompts",
    "verify_annotations": "fiber_data.verify",
    "write_caption_table": "fiber_data.arrow",
    "write_flickr_mdetr_json": "fiber_data.flickr_entities",
    "write_nlvr2_table": "fiber_data.arrow_tasks",
    "write_tar_shards": "fiber_data.webdataset",
    "write_vqa_table": "fiber_data.arrow_tasks",
    "xywh_to_xyxy_plus1": "fiber_data.grounding",
}
__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
