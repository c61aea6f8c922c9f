"""Helpers shared by the fiber-eval tests."""

from __future__ import annotations

from pathlib import Path


def write_entities(root: Path, image_id: str, xml: str, sentences: str, split: str = "test") -> Path:
    """A Flickr30k Entities folder with one image: ``Annotations/<id>.xml``, ``Sentences/<id>.txt``, ``<split>.txt``."""
    (root / "Annotations").mkdir(parents=True)
    (root / "Sentences").mkdir()
    (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "Sentences" / f"{image_id}.txt").write_text(sentences)
    (root / f"{split}.txt").write_text(f"{image_id}\n")
    return root
