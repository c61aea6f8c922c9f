"""The driver of the seeded synthetic "world" of coloured shapes, written to disk in the real dataset formats.

Used for smoke runs and tests of the whole pipeline without downloads. It stands in for the formats of
docs/reference/data-formats.md §2 (Karpathy JSON), §3 (COCO captions), §6 (VQAv2), §8 (NLVR2), §9 (MDETR-style grounding
JSON) and §11.2 (COCO detection), so every loader of this package reads it unchanged.

Each image is a plain grey canvas cut into a 3 x 3 grid; ``min_objects..max_objects`` cells hold one shape
each, with a colour, a shape and a size (small / large) drawn uniformly. The shapes never overlap and are
drawn without anti-aliasing, so every pixel of an object has exactly its palette colour (with the default
lossless PNG) and its COCO box is the tight box of those pixels. Captions name colour, size, shape and grid
position of every object with paraphrased templates, so they discriminate images and image-text retrieval on
held-out images is learnable.

Layout written under ``root``::

    images/{train,val,test}/{split}_{image_id:06d}.png
    annotations/captions_{split}.json     COCO captions (docs/reference/data-formats.md §3)
    annotations/instances_{split}.json    COCO detection (§11.2); categories = "<colour> <shape>" (40 by
                                          default, supercategory = shape); each annotation also carries
                                          "attributes": {"color", "shape", "size", "position"}
    annotations/grounding_{split}.json    MDETR-style grounding (§9): one images entry per (image, caption),
                                          tokens_positive = the "<size> <colour> <shape>" phrase of each box
    annotations/refexp_{split}.json       RefCOCO-style grounding (§9.3): one entry and one box per referring
                                          expression, naming one object among distractors with the fewest
                                          attributes that single it out ("the circle", "the red circle", "the
                                          small red circle", "the red circle on the left" when two small red
                                          circles sit side by side); tokens_positive = the head noun
    annotations/karpathy.json             Karpathy split JSON (§2) over all splits
    annotations/vqa_questions_{split}.json     VQAv2 questions (§6), data_subtype = split; image files are
    annotations/vqa_annotations_{split}.json   "{split}_{image_id:06d}.png" (VQAv2Dataset image_template=
                                          SYNTHETIC_VQA_TEMPLATE, PNG worlds); 10 annotator answers each
    nlvr2/{split}.json                    NLVR2 JSON Lines (§8) about pairs of consecutive images, with the
    nlvr2/images/{split}/                 pair images as "<split>-0-<pair>-img0.png" / "-img1.png"
    tokenizer.json                        a ByteBPETokenizer trained on the train captions (optional)
    world.json                            manifest: config, counts, SHA-256 of the annotation files

Image ids are unique across splits (train first). Generation is deterministic: every image draws from its
own ``numpy`` generator seeded with ``(seed, split, index)`` (its shapes, then its captions); each task's
generator (:mod:`~fiber_data.synthetic.captions`, :mod:`~fiber_data.synthetic.detection`,
:mod:`~fiber_data.synthetic.grounding`, :mod:`~fiber_data.synthetic.vqa`, :mod:`~fiber_data.synthetic.nlvr2`,
:mod:`~fiber_data.synthetic.tokenizer`)
draws from generators of its own. :func:`generate_world` draws and saves the images and hands each to the
task generators the config asks for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from os import PathLike
from pathlib import Path
from typing import Any

from fiber_data.synthetic.captions import CocoCaptionsWriter, KarpathyWriter
from fiber_data.synthetic.config import SPLITS, SyntheticWorldConfig
from fiber_data.synthetic.detection import InstancesWriter
from fiber_data.synthetic.grounding import GroundingWriter, RefexpWriter
from fiber_data.synthetic.language import draw_captions
from fiber_data.synthetic.nlvr2 import NLVR2Writer
from fiber_data.synthetic.scene import draw_image
from fiber_data.synthetic.tokenizer import TokenizerWriter
from fiber_data.synthetic.vqa import VQAWriter
from fiber_data.synthetic.writer import DrawnImage, TaskWriter

log = logging.getLogger(__name__)

__all__ = ["generate_world", "load_world_manifest"]

_MANIFEST = "world.json"
_FORMAT = "fiber-synthetic-world"
_VERSION = 3


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_world_manifest(root: str | PathLike[str]) -> dict[str, Any] | None:
    """The parsed ``world.json`` of ``root``, or ``None`` when there is none (or it is unreadable)."""
    p = Path(root) / _MANIFEST
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == _FORMAT else None


def _is_complete(root: Path, manifest: dict[str, Any], config: SyntheticWorldConfig) -> bool:
    if manifest.get("version") != _VERSION or manifest.get("config") != config.to_dict():
        return False
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            return False
    for split, counts in manifest.get("splits", {}).items():
        folder = root / "images" / split
        n = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
        if n != counts.get("images"):
            return False
    return True


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], object], Callable[[], object]]:
    """An ``(update, close)`` pair: tqdm when installed, else a plain line every 10 %."""
    if not enabled or total == 0:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="synthetic world", unit="img")
        return bar.update, bar.close
    except ImportError:
        state = {"done": 0, "next": max(1, total // 10)}

        def update(n: int) -> None:
            state["done"] += n
            if state["done"] >= state["next"] or state["done"] == total:
                log.info(f"synthetic world: {state['done']}/{total} images")
                state["next"] += max(1, total // 10)

        return update, lambda: None


def _split_sizes(config: SyntheticWorldConfig) -> Iterator[tuple[int, str, int]]:
    for i, (split, n) in enumerate(zip(SPLITS, (config.num_train, config.num_val, config.num_test))):
        yield i, split, n


def _writers(config: SyntheticWorldConfig) -> list[TaskWriter]:
    """The per-task generators the config asks for."""
    writers: list[TaskWriter] = [
        CocoCaptionsWriter(config),
        InstancesWriter(config),
        GroundingWriter(config),
        KarpathyWriter(config),
    ]
    if config.referring_expressions:
        writers.append(RefexpWriter(config))
    if config.vqa_questions_per_image:
        writers.append(VQAWriter(config))
    if config.nlvr2_statements_per_pair:
        writers.append(NLVR2Writer(config))
    if config.tokenizer_vocab_size > 0:
        writers.append(TokenizerWriter(config))
    return writers


def generate_world(
    root: str | PathLike[str],
    config: SyntheticWorldConfig | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic dataset under ``root`` (idempotent).

    If ``root/world.json`` records the same config and every recorded file is intact, nothing is done. If it
    records another config, the previous world (``images/``, ``annotations/``, ``tokenizer.json``) is
    replaced.

    Args:
        root: output folder (created).
        config: what to draw; defaults to ``SyntheticWorldConfig()``.
        progress: show a progress bar (tqdm if installed, else plain lines).
        overwrite: also replace ``images/`` / ``annotations/`` folders that are not from a synthetic world.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        FileExistsError: ``root`` holds ``images/`` or ``annotations/`` without a world manifest and
            ``overwrite`` is false.
    """

    config = config or SyntheticWorldConfig()
    root = Path(root)
    manifest = load_world_manifest(root)
    if manifest is not None and _is_complete(root, manifest, config):
        return root
    _clear(root, foreign=manifest is None, overwrite=overwrite)
    (root / "annotations").mkdir(parents=True)
    update, close = _progress(config.num_train + config.num_val + config.num_test, progress)
    writers = _writers(config)
    next_image_id = 1
    counts: dict[str, dict[str, int]] = {}
    for split_index, split, n in _split_sizes(config):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for writer in writers:
            writer.start_split(split)
        for i in range(n):
            drawn = _draw_image_file(config, folder, split, split_index, i, next_image_id)
            next_image_id += 1
            for writer in writers:
                writer.add(drawn)
            update(1)
        info = {"description": f"FIBER synthetic world ({split})", "version": str(_VERSION)}
        counts[split] = {"images": n}
        for writer in writers:
            counts[split].update(writer.write_split(root, split, info))
    close()
    for writer in writers:
        writer.write_world(root)
    _write_manifest(root, config, counts)
    return root


def _clear(root: Path, *, foreign: bool, overwrite: bool) -> None:
    """Remove what a previous world wrote under ``root``; refuses ``images/`` or ``annotations/`` that are not
    a world's (``foreign``: no manifest) unless ``overwrite``."""
    owned = [root / "images", root / "annotations", root / "nlvr2", root / "tokenizer.json", root / _MANIFEST]
    if foreign and not overwrite and any(p.exists() for p in owned[:2]):
        raise FileExistsError(
            f"{root} already holds images/ or annotations/ that are not a synthetic world; pass overwrite=True "
            "(CLI: --overwrite) to replace them"
        )
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _draw_image_file(
    config: SyntheticWorldConfig, folder: Path, split: str, split_index: int, index: int, image_id: int
) -> DrawnImage:
    """Draw image ``index`` of a split and its captions from its own generator, and save it in ``folder``."""
    import numpy as np

    rng = np.random.default_rng([config.seed, split_index, index])
    image, objects = draw_image(config, rng)
    file_name = f"{split}_{image_id:06d}.{config.image_format}"
    if config.image_format == "png":
        image.save(folder / file_name, format="PNG", optimize=False, compress_level=6)
    else:
        image.save(folder / file_name, format="JPEG", quality=95, subsampling=0)
    captions = draw_captions(objects, rng, config.captions_per_image)  # the image's generator, after drawing
    return DrawnImage(split, split_index, index, image_id, file_name, config.image_size, objects, captions)


def _write_manifest(root: Path, config: SyntheticWorldConfig, counts: dict[str, dict[str, int]]) -> None:
    """``world.json``: format, version, config, counts per split and the SHA-256 of every annotation file."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / "annotations").iterdir())
    if config.nlvr2_statements_per_pair:
        files += sorted(p.relative_to(root).as_posix() for p in (root / "nlvr2").glob("*.json"))
    if config.tokenizer_vocab_size > 0:
        files.append("tokenizer.json")
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "config": config.to_dict(),
        "splits": counts,
        "categories": len(config.categories()),
        "files": {rel: _sha256(root / rel) for rel in files},
    }
    (root / _MANIFEST).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
