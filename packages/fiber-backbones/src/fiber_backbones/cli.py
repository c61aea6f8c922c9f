"""``fiber-backbones`` command line: list variants, report the attention backend, count parameters.

Usage::

    fiber-backbones list
    fiber-backbones info [--backend auto|xformers|sdpa|eager] [--device cpu|cuda]
    fiber-backbones count NAME [--variant coarse|fine_v2|fine_v3|default] [--set key=value ...]
    fiber-backbones convert SRC OUT_DIR [--variant ...] [--image-size N] [--ema] [--geometry NAME]

``convert`` reads an official FIBER checkpoint (coarse Lightning ``.ckpt`` or fine detector ``.pth``) safely and
writes its backbone in our layout (``save_pretrained``) plus ``conversion_report.json`` (dropped keys with reasons,
initialised keys, resized tables, the non-backbone keys left for the heads).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from fiber_backbones.attention import BACKENDS, AttentionCase, resolve_backend, xformers_available
from fiber_backbones.config import VARIANTS
from fiber_backbones.model import FiberBackbone
from fiber_backbones.registry import get_config, list_backbones

__all__ = ["count_parameters", "main"]


def count_parameters(model: FiberBackbone) -> dict[str, int]:
    """Parameter counts per module group (docs/reference/architecture.md §12 grouping).

    Returns:
        ``{"image_unimodal", "image_i2t", "text_unimodal", "text_t2i", "total"}``.
    """
    fusion = {name for name, _ in model.named_fusion_parameters()}
    counts = {"image_unimodal": 0, "image_i2t": 0, "text_unimodal": 0, "text_t2i": 0}
    for name, p in model.named_parameters():
        side = "image" if name.startswith("image_encoder.") else "text"
        kind = ("i2t" if side == "image" else "t2i") if name in fusion else "unimodal"
        counts[f"{side}_{kind}"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _parse_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="fiber-backbones", description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered backbones")
    info = sub.add_parser("info", help="environment and attention backend")
    info.add_argument("--backend", choices=BACKENDS, default=None)
    info.add_argument("--device", default=None, help="device to resolve for (default: cuda if available)")
    count = sub.add_parser("count", help="parameter counts per module group (built on the meta device)")
    count.add_argument("name")
    count.add_argument("--variant", choices=VARIANTS, default=None)
    count.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    conv = sub.add_parser("convert", help="official FIBER checkpoint -> our backbone layout (safetensors)")
    conv.add_argument("src", help="official checkpoint file (.ckpt / .pth / .safetensors)")
    conv.add_argument("out_dir", help="output directory (config.json, model.safetensors, conversion_report.json)")
    conv.add_argument("--variant", choices=VARIANTS, default=None, help="target variant (default: the source's)")
    conv.add_argument("--image-size", type=int, default=None, help="coarse target resolution (e.g. 576)")
    conv.add_argument("--ema", action="store_true", help="fine checkpoints: convert 'model_ema' instead of 'model'")
    conv.add_argument("--geometry", default="fiber-base", help="registered geometry of the checkpoint")
    args = parser.parse_args(argv)

    if args.command == "list":
        for entry in list_backbones():
            print(f"{entry.name:<20} {entry.description}")
        return 0
    if args.command == "info":
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"python {platform.python_version()}, torch {torch.__version__}")
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"device: {device} (cuda: {cuda})")
        print(f"xformers importable: {xformers_available()}")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        dev_type = torch.device(device).type
        cases = (
            ("text self-attention (training)", AttentionCase(dev_type, dtype, 64, "none", True, True, True)),
            ("cross-attention i2t (training)", AttentionCase(dev_type, dtype, 32, "none", True, False, True)),
            ("Swin window attention (training)", AttentionCase(dev_type, dtype, 32, "bias_grad", False, False, True)),
            ("Swin window attention (inference)", AttentionCase(dev_type, dtype, 32, "bias", False, False, False)),
        )
        for what, case in cases:  # under auto, xformers is probed on each case (a tiny call, cached)
            name, reason = resolve_backend(args.backend, device=device, case=case)
            print(f"{what}: {name} -- {reason}")
        return 0
    if args.command == "convert":
        return _convert(args)
    overrides: dict[str, object] = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        overrides[key] = _parse_value(raw)
    if args.variant:
        overrides["variant"] = args.variant
    cfg = get_config(args.name, **overrides)
    with torch.device("meta"):
        model = FiberBackbone(cfg)
    for group, n in count_parameters(model).items():
        print(f"{group:<16} {n:>14,}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fiber_backbones.convert import (
        build_converted_backbone,
        convert_official_backbone,
        default_target_variant,
        detect_source,
        read_official_checkpoint,
    )
    from fiber_backbones.weights import save_pretrained

    src = Path(args.src)
    state, container = read_official_checkpoint(src, ema=args.ema)
    source = detect_source(state, where=str(src))
    variant = args.variant or default_target_variant(state, source)
    report = convert_official_backbone(
        state, source=source, target_variant=variant, image_size=args.image_size, geometry=args.geometry, where=str(src)
    )
    out = save_pretrained(build_converted_backbone(report), args.out_dir, metadata={"converted_from": src.name})
    summary = {"source_file": str(src), **report.summary(), "container": container}
    (out / "conversion_report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"{source} checkpoint {src} -> {out} ({variant}, {report.config.swin.img_size}px): {len(report.key_map)} mapped, "
        f"{len(report.dropped)} dropped, {len(report.initialised)} initialised, {len(report.resized)} tables resized, "
        f"{len(report.rest)} non-backbone keys left for the heads"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
