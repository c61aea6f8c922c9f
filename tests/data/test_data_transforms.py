"""ImageTransform numbers and image-loading errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fiber_data import IMAGENET_MEAN, IMAGENET_STD, DataError, ImageLoadError, ImageTransform, load_image


def test_constant_image_normalises_to_known_values() -> None:
    image = Image.new("RGB", (30, 20), (255, 0, 128))
    out = ImageTransform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((16, 16), expected[c]), atol=1e-6)


def test_matches_pil_bicubic_resize_reference() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = ImageTransform(12, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(image)
    ref = np.asarray(image.resize((12, 12), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0  # [H, W, 3]
    ref = (ref - 0.5) / np.array([0.25, 0.5, 1.0])
    assert np.allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    # Non-RGB inputs are converted; the aspect ratio is not kept.
    assert ImageTransform(8)(Image.new("L", (40, 10), 7)).shape == (3, 8, 8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(8, interpolation="lanczos5")
    with pytest.raises(ValueError, match="std"):
        ImageTransform(8, std=(0.0, 1.0, 1.0))


def test_load_image_errors_name_file_and_record(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg") as info:
        load_image(missing, record="annotations[4]")
    assert info.value.file == str(missing) and info.value.record == "annotations[4]"
    assert "record annotations[4]" in str(info.value)
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageLoadError, match=r"bad\.png: record 7: cannot decode image"):
        load_image(corrupt, record=7)
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(truncated)
    ok = load_image(tmp_path / "full.jpg")
    assert ok.mode == "RGB" and ok.size == (64, 64)


def test_errors_survive_pickling_for_dataloader_workers() -> None:
    err = ImageLoadError("cannot decode", file="/x/y.jpg", record="images[3]")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageLoadError) and isinstance(back, DataError)
    assert (back.file, back.record, str(back)) == (err.file, err.record, str(err))


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from fiber_data import load_image, load_image_bytes

    grey = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    expected = (grey.astype(np.int64) + 128) // 257
    for image in (load_image(path), load_image_bytes(path.read_bytes())):
        rgb = np.asarray(image)
        assert image.mode == "RGB" and rgb.shape == (32, 32, 3)
        assert (rgb == expected[..., None]).all()  # today: 254.5 mean, nearly all white
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 200, dtype=np.int32)).save(buf, format="TIFF")  # mode I within 0..255: kept
    assert np.asarray(load_image_bytes(buf.getvalue()))[0, 0].tolist() == [200, 200, 200]
