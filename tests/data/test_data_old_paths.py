"""The module paths of the flat layout (before the regrouping into sources/, formats/, text/, images/,
synthetic/) still import, and give the very objects of the new modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import fiber_data

#: old module -> (its ``__all__`` before the regrouping, the new module(s) holding those names)
OLD_PATHS: dict[str, tuple[list[str], list[str]]] = {
    "arrow": (
        ["ArrowCaptionDataset", "karpathy_to_arrow", "read_arrow_table", "write_caption_table"],
        ["formats.arrow"],
    ),
    "arrow_tasks": (
        ["ArrowNLVR2Dataset", "ArrowVQADataset", "write_nlvr2_table", "write_vqa_table"],
        ["sources.vqa", "sources.nlvr2"],
    ),
    "augment": (
        [
            "RANDAUGMENT_OPS",
            "CoarseTrainTransform",
            "RandAugment",
            "crop_boxes",
            "flip_caption",
            "mentions_left_right",
            "pad_boxes",
            "random_resized_crop_params",
        ],
        ["images.augment", "text.left_right"],
    ),  # fmt: skip
    "coco_captions": (
        [
            "CaptionTable",
            "CocoCaptionsDataset",
            "ImageFolderDataset",
            "ImageTextDataset",
            "KarpathyCaptionsDataset",
            "RetrievalCorpus",
            "load_retrieval_corpus",
            "read_coco_captions",
            "read_karpathy",
        ],
        ["sources.coco_captions"],
    ),  # fmt: skip
    "detection": (["REPAIR_KINDS", "DetectionGroundingDataset"], ["sources.detection", "boxes"]),
    "flickr_entities": (
        [
            "FlickrEntitiesDataset",
            "FlickrEntitiesRecord",
            "FlickrPhraseSpan",
            "parse_entities_xml",
            "parse_entities_sentence",
            "read_flickr_entities",
            "write_flickr_mdetr_json",
        ],
        ["sources.flickr_entities"],
    ),  # fmt: skip
    "grounding": (
        ["AspectRatioBatchSampler", "GroundingCollator", "MdetrGroundingDataset", "xywh_to_xyxy_plus1"],
        ["sources.grounding", "boxes"],
    ),
    "nlvr2": (["NLVR2Collator", "NLVR2Dataset", "pair_identifier"], ["sources.nlvr2"]),
    "sources": (
        ["ConcatImageTextDataset", "read_annot_pairs", "read_visual_genome"],
        ["sources.concat", "sources.cc_sbu", "sources.visual_genome"],
    ),  # fmt: skip
    "streaming": (["WebDatasetImageText", "expand_urls", "iter_url_samples"], ["formats.streaming"]),
    "synthetic": (
        [
            "PALETTE",
            "SYNTHETIC_VQA_TEMPLATE",
            "POSITIONS",
            "SHAPES",
            "SyntheticWorldConfig",
            "generate_world",
            "load_world_manifest",
        ],
        ["synthetic.config", "synthetic.world"],
    ),  # fmt: skip
    "tokenization": (
        ["ByteBPETokenizer", "HFTokenizer", "load_tokenizer", "mask_tokens", "positive_map_from_spans"],
        ["text.tokenizer", "text.masking", "text.spans"],
    ),
    "transforms": (
        [
            "BGR255_MEAN",
            "BGR255_STD",
            "IMAGENET_MEAN",
            "IMAGENET_STD",
            "GroundingTransform",
            "ImageTransform",
            "hflip_boxes",
            "load_image",
            "load_image_bytes",
            "resize_boxes",
            "resized_size",
        ],
        ["images.transforms"],
    ),  # fmt: skip
    "tsv": (["TSVDetectionDataset", "build_lineidx", "write_tsv"], ["formats.tsv"]),
    "tv_decode": (["TorchvisionImageTransform", "decode_image_tensor", "read_image_file"], ["images.tv_decode"]),
    "vqa": (
        [
            "AnswerVocab",
            "VQACollator",
            "VQAv2Dataset",
            "answer_scores",
            "build_answer_vocab",
            "normalize_word",
            "score_for_count",
        ],
        ["sources.vqa"],
    ),  # fmt: skip
    "webdataset": (
        ["TarImageTextDataset", "expand_shards", "iter_tar_members", "iter_tar_samples", "write_tar_shards"],
        ["formats.tar"],
    ),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_path_gives_the_objects_of_the_new_modules(old: str) -> None:
    names, new = OLD_PATHS[old]
    module = importlib.import_module(f"fiber_data.{old}")
    homes = [importlib.import_module(f"fiber_data.{n}") for n in new]
    for name in names:
        home = next(m for m in homes if name in vars(m))  # the module that defines or imports it now
        assert getattr(module, name) is getattr(home, name), f"fiber_data.{old}.{name}"
        if name in fiber_data.__all__:
            assert getattr(fiber_data, name) is getattr(home, name)
    if len(new) == 1:  # a moved module is the same module object under both names
        assert module is homes[0]
    assert set(names) <= set(getattr(module, "__all__", names)) | set(dir(module))


def test_a_split_module_supports_star_import_and_from_import() -> None:
    namespace: dict[str, object] = {}
    exec("from fiber_data.tokenization import *", namespace)
    from fiber_data.text.masking import mask_tokens
    from fiber_data.text.tokenizer import load_tokenizer

    assert namespace["mask_tokens"] is mask_tokens and namespace["load_tokenizer"] is load_tokenizer
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = importlib.import_module("fiber_data.tokenization").nothing_here


def test_unknown_old_path_still_fails() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fiber_data.no_such_module")


def test_public_names_are_a_superset_of_the_flat_layout() -> None:
    """Every name of ``fiber_data.__all__`` before the regrouping is still exported and resolves."""
    before = {
    "AnnotationError", "AnswerVocab", "ArrowCaptionDataset", "ArrowNLVR2Dataset", "ArrowVQADataset",
    "AspectRatioBatchSampler", "BGR255_MEAN", "BGR255_STD", "ByteBPETokenizer", "CaptionTable",
    "CoarseTrainTransform", "CocoCaptionsDataset", "ConcatImageTextDataset", "DataError",
    "DetectionGroundingDataset", "DetectionPromptSampler", "EmptyBatch", "Encoding", "FlickrEntitiesDataset",
    "GroundingBatch", "GroundingCollator", "GroundingSample", "GroundingTarget", "GroundingTransform",
    "HFTokenizer", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "ImageLoadError", "ImageTextBatch",
    "ImageTextCollator", "ImageTextDataset", "ImageTextSample", "ImageTransform", "KarpathyCaptionsDataset",
    "MdetrGroundingDataset", "MissingExtraError", "NLVR2Batch", "NLVR2Collator", "NLVR2Dataset", "NLVR2Sample",
    "Prompt", "RandAugment", "RetrievalCorpus", "SYNTHETIC_VQA_TEMPLATE", "SkipBadSamples", "SkippedSample",
    "SyntheticWorldConfig", "TSVDetectionDataset", "TarImageTextDataset", "Tokenizer", "TokenizerError",
    "VQABatch", "VQACollator", "VQASample", "VQAv2Dataset", "VerifyReport", "answer_scores",
    "build_answer_vocab", "build_prompt", "chunk_prompts", "clean_class_name", "crop_boxes", "dataset_stats",
    "expand_shards", "flip_caption", "generate_world", "iter_tar_samples", "karpathy_to_arrow", "load_image",
    "load_image_bytes", "load_retrieval_corpus", "load_tokenizer", "load_world_manifest", "mask_tokens",
    "normalize_word", "pad_boxes", "positive_map_from_spans", "read_annot_pairs", "read_arrow_table",
    "read_coco_captions", "read_flickr_entities", "read_karpathy", "read_visual_genome", "token_counter",
    "verify_annotations", "write_caption_table", "write_flickr_mdetr_json", "write_nlvr2_table",
    "write_tar_shards", "write_vqa_table", "xywh_to_xyxy_plus1",
    }  # fmt: skip
    assert len(before) == 92
    assert before <= set(fiber_data.__all__)
    assert all(hasattr(fiber_data, n) for n in fiber_data.__all__)


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "fiber_data", "--help"], capture_output=True, text=True, check=True)
    assert "synth" in out.stdout and "verify" in out.stdout


def test_old_path_imports_first_thing_in_a_fresh_interpreter() -> None:
    """The alias finder is installed by importing the parent package, so an old path works as the first import."""
    code = "import fiber_data.tokenization as t; from fiber_data.vqa import normalize_word; print(t.mask_tokens.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fiber_data.text.masking"
