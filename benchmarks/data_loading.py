"""Input-pipeline throughput of the coarse pre-training loader on photo-like JPEGs, against the GPU step rate.

Writes ``--images`` photo-like JPEGs (:func:`photo_like`: 1/f "pink" noise luminance and colour fields, soft
shapes, fine grain; sides drawn from 500-640 px; quality 90, 4:2:0; 70-200 KB each like web photos, not flat
drawings), a COCO captions file over them (captions and tokenizer of a small synthetic world) and times
``torch.utils.data.DataLoader`` passes per decoder and worker count:

- ``pil``: the library path, :class:`fiber_data.CocoCaptionsDataset` + :class:`fiber_data.ImageTransform`
  (PIL decode, bicubic resize to ``--size``, float normalisation in the worker);
- ``tvio``: ``torchvision.io.decode_jpeg`` (libjpeg-turbo) on the worker, bicubic antialiased resize of the
  ``uint8`` tensor, batches of ``uint8`` (4x less to pin and copy) normalised on the device;
- ``gpu`` (``--device cuda`` only): workers read the encoded bytes; the main process decodes the batch on the GPU
  (``decode_jpeg(..., device="cuda")``, nvJPEG), resizes and normalises there.

Every variant tokenises the captions and masks 15 % for MLM (:class:`fiber_data.ImageTextCollator`, 40 tokens),
uses ``pin_memory`` on CUDA and ``persistent_workers`` (``--no-persistent`` to compare), runs ``--epochs`` passes
(epoch restarts included) and moves each batch to ``--device``. Samples/s exclude the first batch (worker
start-up). The GPU rate to feed is ``--batch / --gpu-step-s`` (default 32 / 0.299 s: the measured coarse step,
fiber-base, 384 px, bf16, H200) and ``--target-samples-per-s`` (300: the issue's goal); ``keeps_up`` asks for
``--margin`` (1.5) times the target.

Usage::

    python benchmarks/data_loading.py --workers 0 1 2            # CPU machine
    python benchmarks/data_loading.py --device cuda --workers 4 8 12 --decoders pil tvio gpu
    python benchmarks/data_loading.py --quick
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from _common import Recorder, base_parser, finish, setup
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fiber_data import (
    ByteBPETokenizer,
    CocoCaptionsDataset,
    ImageTextCollator,
    ImageTransform,
    SyntheticWorldConfig,
    generate_world,
)
from fiber_data.types import ImageTextSample

warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision 0.29 deprecates torchvision.io decoding


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A textured RGB image with photo statistics: a 1/f^2 power spectrum (natural scenes), correlated colour,
    a few soft-edged shapes and sensor-like grain, so JPEG coding and decoding cost what a photo costs."""

    def pink(exponent: float) -> np.ndarray:
        fy = np.fft.fftfreq(height)[:, None]
        fx = np.fft.rfftfreq(width)[None, :]
        f = np.sqrt(fx**2 + fy**2)
        f[0, 0] = 1.0
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (exponent / 2)
        field = np.fft.irfft2(spectrum, s=(height, width))
        return (field - field.mean()) / (field.std() + 1e-9)

    luma = 0.75 * pink(2.0) + 0.25 * pink(1.2)
    base = rng.uniform(60, 190, size=3)
    tint = rng.normal(0, 1, size=(2, 3))
    img = base + 38 * luma[..., None] + 14 * pink(2.4)[..., None] * tint[0] + 10 * pink(2.0)[..., None] * tint[1]
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 8))):  # objects: soft ellipses with their own colour and texture
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        mask = np.clip(1.5 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2), 0, 1)[..., None]
        colour = rng.uniform(0, 255, size=3) + 25 * pink(1.6)[..., None]
        img = img * (1 - mask) + colour * mask
    img += rng.normal(0, 4.0, size=img.shape)  # grain
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_photos(root: Path, n: int, min_side: int, max_side: int, seed: int = 0) -> dict[str, Any]:
    """``n`` photo-like JPEGs + ``captions.json`` (COCO captions) + ``tokenizer.json`` under ``root``."""
    world = root / "world"
    generate_world(
        world,
        SyntheticWorldConfig(
            image_size=64, num_train=8, num_val=2, num_test=2, vqa_questions_per_image=0, nlvr2_statements_per_pair=0
        ),
        progress=False,
    )
    captions = [
        a["caption"] for a in json.loads((world / "annotations/captions_train.json").read_text())["annotations"]
    ]
    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    images, anns, sizes = [], [], []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        name = f"{i:06d}.jpg"
        photo_like(rng, w, h).save(root / "photos" / name, quality=90)
        sizes.append((root / "photos" / name).stat().st_size)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "caption": captions[i % len(captions)]})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return {"jpeg_kb_mean": float(np.mean(sizes)) / 1024, "jpeg_kb_min": min(sizes) / 1024, "tokenizer": world}


class TensorDecodeCaptions(Dataset):
    """The captions of a :class:`~fiber_data.CocoCaptionsDataset` with images decoded by ``torchvision.io``:
    ``uint8 [3, S, S]`` (``decode="cpu"``), or the encoded bytes ``uint8 [N]`` for a GPU decode (``"bytes"``)."""

    def __init__(self, base: CocoCaptionsDataset, size: int, decode: str) -> None:
        self.base, self.size, self.decode = base, size, decode

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> ImageTextSample:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms.v2.functional import InterpolationMode, resize

        table = self.base.table
        data = read_file(str(table.image_paths[int(table.text_to_image[index])]))
        if self.decode == "cpu":
            img = cast(torch.Tensor, decode_jpeg(data, mode=ImageReadMode.RGB))  # one encoded image: one tensor
            data = resize(img, [self.size, self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return ImageTextSample(self.base.image_id(index), data, self.base.caption(index), index)


class RawCollator:
    """:class:`~fiber_data.ImageTextCollator` for text, images kept as they are: stacked ``uint8`` or a list of
    encoded JPEGs (``pixel_values`` then holds the list)."""

    def __init__(self, text: ImageTextCollator, stack: bool) -> None:
        self.text, self.stack = text, stack

    def __call__(self, samples: list[ImageTextSample]) -> Any:
        empty = torch.empty(0)
        batch = self.text([dataclasses.replace(s, image=empty) for s in samples])
        pixels = torch.stack([s.image for s in samples]) if self.stack else [s.image for s in samples]
        return dataclasses.replace(batch, pixel_values=pixels)


class Consumer:
    """What the training step does with a batch before the model: device copy and (for uint8/encoded images)
    decode, resize and normalisation on the device."""

    def __init__(self, decoder: str, size: int, device: torch.device) -> None:
        self.decoder, self.size, self.device = decoder, size, device
        t = ImageTransform(size)
        self.mean = torch.tensor(t.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(t.std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: Any) -> torch.Tensor:
        pixels = batch.pixel_values
        if self.decoder == "pil":
            return pixels.to(self.device, non_blocking=True)
        if self.decoder == "tvio":
            pixels = pixels.to(self.device, non_blocking=True)
        else:  # gpu: nvJPEG batch decode, then resize on the device
            from torchvision.io import ImageReadMode, decode_jpeg
            from torchvision.transforms.v2.functional import InterpolationMode, resize

            images = decode_jpeg(pixels, mode=ImageReadMode.RGB, device=self.device)
            pixels = torch.stack(
                [resize(im, [self.size] * 2, interpolation=InterpolationMode.BICUBIC, antialias=True) for im in images]
            )
        return (pixels.float() - self.mean) / self.std


def build(decoder: str, root: Path, tokenizer: ByteBPETokenizer, size: int) -> tuple[Dataset, Any]:
    base = CocoCaptionsDataset(root / "captions.json", root / "photos", transform=ImageTransform(size))
    text = ImageTextCollator(tokenizer, max_length=40, mlm_probability=0.15)
    if decoder == "pil":
        return base, text
    return TensorDecodeCaptions(base, size, "cpu" if decoder == "tvio" else "bytes"), RawCollator(
        text, stack=decoder == "tvio"
    )


def measure(
    ds: Dataset, collate: Any, consume: Consumer, batch: int, workers: int, epochs: int, pin: bool, persistent: bool
) -> dict[str, Any]:
    """Samples/s over ``epochs`` passes (epoch restarts included), excluding the first batch."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
    )
    device = consume.device
    t_start = time.perf_counter()
    n, first, t0 = 0, None, 0.0
    out: Any = None
    for _ in range(epochs):
        for b in loader:
            out = consume(b)
            if first is None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t_start
                t0 = time.perf_counter()
                continue
            n += len(b.captions)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del loader, out
    return {"first_batch_s": first, "samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else None}


def pixel_agreement(root: Path, tokenizer: ByteBPETokenizer, size: int, n: int = 4) -> float:
    """Mean |pil - tvio| of the normalised pixels of ``n`` images (the two bicubic resizes differ slightly)."""
    pil_ds, _ = build("pil", root, tokenizer, size)
    tv_ds, _ = build("tvio", root, tokenizer, size)
    consume = Consumer("tvio", size, torch.device("cpu"))
    diffs = []
    for i in range(n):
        a = pil_ds[i].image
        b = consume(type("B", (), {"pixel_values": tv_ds[i].image[None]})())[0]
        diffs.append(float((a - b).abs().mean()))
    return float(np.mean(diffs))


def per_image_ms(ds: Dataset, n: int, repeat: int = 3) -> float:
    """Best-of-``repeat`` milliseconds to load one sample (read, decode, resize) in this process, one thread: the
    cost a worker pays per sample, less sensitive to other jobs than a loader's wall-clock rate."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            ds[i]
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = base_parser((__doc__ or "").splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="photo folder (default: a temporary one)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default 0 1 2 (quick 0 1)")
    p.add_argument("--decoders", nargs="+", default=None, help="pil tvio gpu (default pil tvio, + gpu on cuda)")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 32, quick 4)")
    p.add_argument("--images", type=int, default=None, help="photos (default 192, quick 12)")
    p.add_argument("--min-side", type=int, default=None, help="smallest photo side (default 500, quick 120)")
    p.add_argument("--max-side", type=int, default=None, help="largest photo side (default 640, quick 160)")
    p.add_argument("--size", type=int, default=None, help="training image side (default 384, quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="passes per measurement (default 2, quick 2)")
    p.add_argument("--no-persistent", action="store_true", help="workers restart every epoch")
    p.add_argument("--gpu-step-s", type=float, default=0.299, help="GPU seconds per batch of --batch samples")
    p.add_argument("--target-samples-per-s", type=float, default=300.0, help="GPU throughput goal")
    p.add_argument("--margin", type=float, default=1.5, help="required loader rate / target")
    args = p.parse_args(argv)
    device = setup(args, repeat=(1, 1), warmup=(0, 0))
    q = args.quick
    workers = args.workers if args.workers is not None else ([0, 1] if q else [0, 1, 2])
    decoders = args.decoders or (["pil", "tvio"] + (["gpu"] if device.type == "cuda" else []))
    if "gpu" in decoders and device.type != "cuda":
        raise SystemExit("--decoders gpu needs --device cuda")
    batch = args.batch or (4 if q else 32)
    n_images = args.images or (12 if q else 192)
    min_side, max_side = args.min_side or (120 if q else 500), args.max_side or (160 if q else 640)
    size = args.size or (64 if q else 384)
    epochs = args.epochs or 2
    pin = device.type == "cuda"
    persistent = not args.no_persistent
    gpu_rate = batch / args.gpu_step_s
    need = args.margin * args.target_samples_per_s
    rec = Recorder(
        "data_loading",
        args,
        {
            "workers": workers,
            "decoders": decoders,
            "batch": batch,
            "images": n_images,
            "sides": [min_side, max_side],
            "size": size,
            "epochs": epochs,
            "pin_memory": pin,
            "persistent_workers": persistent,
            "gpu_step_s": args.gpu_step_s,
            "gpu_samples_per_s_now": gpu_rate,
            "target_samples_per_s": args.target_samples_per_s,
            "needed_samples_per_s": need,
        },
    )
    with tempfile.TemporaryDirectory(prefix="fiber_bench_photos_") as tmp:
        root = args.root or Path(tmp)
        t0 = time.perf_counter()
        info = write_photos(root, n_images, min_side, max_side)
        rec.doc["photo_generation_s"] = time.perf_counter() - t0
        rec.doc["jpeg_kb_mean"] = info["jpeg_kb_mean"]
        tokenizer = ByteBPETokenizer.load(info["tokenizer"] / "tokenizer.json")
        if "tvio" in decoders:
            rec.doc["mean_abs_diff_pil_vs_tvio"] = pixel_agreement(root, tokenizer, size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        rec.doc["per_image_ms_one_thread"] = {
            d: per_image_ms(build(d, root, tokenizer, size)[0], min(n_images, 16)) for d in decoders if d != "gpu"
        }
        torch.set_num_threads(threads)
        rec.doc["cores_needed_for_needed_rate"] = {
            d: math.ceil(need * ms / 1e3) for d, ms in rec.doc["per_image_ms_one_thread"].items()
        }
        print(f"per image (one thread, best of 3): {rec.doc['per_image_ms_one_thread']} ms")
        for decoder in decoders:
            ds, collate = build(decoder, root, tokenizer, size)
            consume = Consumer(decoder, size, device)
            for w in workers:
                r = measure(ds, collate, consume, batch, w, epochs, pin, persistent)
                rate = r["samples_per_s"] or 0.0
                per_worker = rate / max(w, 1)
                rec.add(
                    {
                        "decoder": decoder,
                        "workers": w,
                        "batch": batch,
                        **r,
                        "samples_per_s_per_worker": per_worker,
                        "x_gpu_now": rate / gpu_rate,
                        "x_target": rate / args.target_samples_per_s,
                        "keeps_up": rate >= need,
                        "workers_needed": math.ceil(need / per_worker) if per_worker > 0 else None,
                    }
                )
    rec.note(
        f"gpu now = {batch} / {args.gpu_step_s} s = {gpu_rate:.0f} samples/s; needed = {args.margin} x target "
        f"{args.target_samples_per_s:.0f} = {need:.0f} samples/s; workers_needed extrapolates samples_per_s_per_worker "
        "(linear in cores: only as many workers as free cores)"
    )
    rec.note(f"photo-like JPEGs, mean {info['jpeg_kb_mean']:.0f} KB; workers 0 = loading in the main process")
    rec.note(
        "per_image_ms_one_thread: best-of-3 load cost of one sample (read + decode + resize) in one thread; "
        "cores_needed_for_needed_rate = needed samples/s x that cost (decode only; tokenisation and the copy are "
        "extra)"
    )
    finish(
        rec,
        rec.results,
        [
            "decoder",
            "workers",
            "batch",
            "samples_per_s",
            "samples_per_s_per_worker",
            "x_gpu_now",
            "x_target",
            "keeps_up",
            "workers_needed",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
