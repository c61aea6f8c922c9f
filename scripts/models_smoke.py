"""fiber-models alone: build a tiny model, save it, load it and run pipelines, with no trainer installed.

Run by ``scripts/check_packaging.py`` inside a venv holding only fiber-models and its declared dependencies;
it fails when lightning-fabric or fiber-train is importable there, or when a loaded model or pipeline does not
give what the model in memory gives.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

import fiber_models
from fiber_backbones import TextInputs, create_backbone
from fiber_data import ByteBPETokenizer
from fiber_models import CoarseModel, Preprocessing, pipeline


def main() -> int:
    for name in ("lightning", "lightning_fabric", "fiber_train"):
        if importlib.util.find_spec(name) is not None:
            print(f"models_smoke: {name} is importable; this check needs a venv without it", file=sys.stderr)
            return 1
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_file = root / "tok.json"
        ByteBPETokenizer.train(["a red circle", "a blue square"] * 8, 270).save(tok_file)
        backbone = create_backbone("fiber-tiny", text={"vocab_size": 270})
        model = CoarseModel(backbone, 270, 32, 32, {"itc": 1.0, "itm": 1.0, "mlm": 1.0}).eval()
        saved = model.save_pretrained(root / "model", tokenizer=tok_file, preprocessing=Preprocessing(image_size=64))
        loaded = fiber_models.load(saved)
        image = root / "red.png"
        Image.new("RGB", (80, 60), "red").save(image)
        scores = pipeline("image-text-scoring", loaded)([str(image)], ["a red circle"])
        batch = fiber_models.FiberProcessor.from_pretrained(saved)(images=[str(image)], text=["a red circle"])
        assert batch.pixel_values is not None and batch.input_ids is not None and batch.attention_mask is not None
        with torch.no_grad():
            itc = float(
                model.embed_images(batch.pixel_values)[0]
                @ model.embed_texts(TextInputs(batch.input_ids, batch.attention_mask))[0]
            )
        if abs(scores[0].itc - itc) > 1e-5:
            print(f"models_smoke: pipeline ITC {scores[0].itc} != model ITC {itc}", file=sys.stderr)
            return 1
    print(
        f"  fiber_models: saved, loaded and scored a {type(loaded).__name__} without lightning-fabric (itc {itc:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
