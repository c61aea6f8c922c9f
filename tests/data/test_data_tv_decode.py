"""Decoding through torchvision.io (fiber_data.tv_decode): same pixels as the PIL path, errors naming the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import CocoCaptionsDataset, ImageLoadError, ImageTransform
from fiber_data.images.tv_decode import TorchvisionImageTransform, decode_image_tensor

pytest.importorskip("torchvision")


def _photo(seed: int, w: int = 90, h: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)  # textured, not flat
    img = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9) * 200 + rng.normal(0, 6, (h, w, 3)) + 20
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_same_pixels_as_the_pil_transform(fmt: str) -> None:
    data = _encode(_photo(0), fmt)
    ref = ImageTransform(48)(Image.open(io.BytesIO(data)))
    got = TorchvisionImageTransform(48).from_bytes(data)
    assert got.shape == ref.shape == (3, 48, 48) and got.dtype == torch.float32
    diff = (got - ref).abs()
    # same decoder family and the same antialiased bicubic kernel: off by at most a rounding step of uint8
    assert float(diff.mean()) < 2e-3 and float(diff.max()) <= 1.01 / 255 / min(ImageTransform(48).std)
    # a decoded image (PIL, any mode, or a uint8 tensor) gives the same as its bytes
    torch.testing.assert_close(TorchvisionImageTransform(48)(Image.open(io.BytesIO(data))), got)
    torch.testing.assert_close(TorchvisionImageTransform(48)(decode_image_tensor(data)), got)
    gray = Image.open(io.BytesIO(data)).convert("L")
    torch.testing.assert_close(TorchvisionImageTransform(48)(gray), ImageTransform(48)(gray), atol=0.02, rtol=0)


def test_dataset_reads_bytes_and_names_the_bad_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        _photo(i).save(tmp_path / "img" / f"{i}.jpg", quality=90)
    (tmp_path / "img" / "2.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ann = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"photo {i}"} for i in range(4)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    pil = CocoCaptionsDataset(tmp_path / "captions.json", tmp_path / "img", ImageTransform(32))
    tv = CocoCaptionsDataset(tmp_path / "captions.json", tmp_path / "img", TorchvisionImageTransform(32))
    for i in (0, 1):
        assert float((tv[i].image - pil[i].image).abs().mean()) < 2e-3
    with pytest.raises(ImageLoadError, match=r"2\.jpg.*cannot decode image bytes"):
        tv[2]
    with pytest.raises(ImageLoadError, match=r"3\.jpg.*image file not found"):
        tv[3]


def test_only_antialiased_kernels() -> None:
    with pytest.raises(ValueError, match="bicubic or bilinear"):
        TorchvisionImageTransform(32, interpolation="nearest")
