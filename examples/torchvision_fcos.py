"""Train torchvision's FCOS on top of the FIBER fusion backbone (docs/reference/design.md §11, "Plugging the backbone into
other detectors"; FPN of ``docs/reference/training.md`` §3.2).

Full-size setup (FIBER-B fine_v2 + 256-channel FPN with P6/P7 + torchvision FCOS, images resized to 800-1333 px
by default, see ``--min-size``/``--max-size``), on a GPU::

    python examples/torchvision_fcos.py --weights weights/fiber-base-fine --prompt "red box. green box. blue box."

``--weights`` is a directory written by ``fiber_backbones.save_pretrained`` (e.g. after ``fiber-backbones
convert`` of an official fine checkpoint); without it the backbone is randomly initialised. ``--prompt`` is
tokenised with the RoBERTa tokenizer (``--tokenizer``, needs it downloaded or cached) and bound as one prompt for
the whole dataset (closed-set detection): the backbone then returns *fused* features and ``backbone.last_output``
holds the text features. Without ``--prompt`` the backbone is a plain Swin (uni-modal path).

CPU smoke run in seconds (``fiber-tiny``, 32-channel FPN, 64x96 images, random prompt ids)::

    python examples/torchvision_fcos.py --tiny

Both train on synthetic images of coloured rectangles drawn here (class = colour), print the losses, then run
inference on the training images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torchvision.models.detection import FCOS

from fiber_backbones import TextInputs
from fiber_backbones.adapters.torchvision import FiberFPNBackbone

COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def synthetic_rectangles(
    n: int, height: int, width: int, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` images ``[3, height, width]`` in ``[0, 1]`` with 1-2 coloured rectangles; torchvision targets."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.full((3, height, width), 0.5)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            w = int(torch.randint(width // 4, width // 2, (1,), generator=g))
            h = int(torch.randint(height // 4, height // 2, (1,), generator=g))
            x0 = int(torch.randint(0, width - w, (1,), generator=g))
            y0 = int(torch.randint(0, height - h, (1,), generator=g))
            colour = int(torch.randint(0, len(COLOURS), (1,), generator=g))
            img[:, y0 : y0 + h, x0 : x0 + w] = COLOURS[colour][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(colour + 1)  # 0 is background in torchvision's detectors
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def tokenize_prompt(prompt: str, tokenizer_name: str, max_length: int = 256) -> TextInputs:
    """One-row :class:`TextInputs` for ``prompt`` with the backbone's RoBERTa tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_name)
    enc = tok([prompt], truncation=True, max_length=max_length, return_tensors="pt")
    return TextInputs(enc["input_ids"], enc["attention_mask"].bool())


def build(args: argparse.Namespace) -> tuple[FCOS, FiberFPNBackbone]:
    """The FIBER + FPN backbone and the FCOS detector around it."""
    num_classes = len(COLOURS) + 1
    if args.tiny:
        backbone = FiberFPNBackbone.from_name("fiber-tiny", variant="fine_v2", out_channels=32)
        detector = FCOS(backbone, num_classes=num_classes, min_size=args.height, max_size=args.width)
    else:
        backbone = FiberFPNBackbone.from_name(
            "fiber-base", variant=args.variant, pretrained=args.weights, out_channels=256
        )
        backbone.body.backbone.set_grad_checkpointing(args.grad_checkpointing)
        detector = FCOS(backbone, num_classes=num_classes, min_size=args.min_size, max_size=args.max_size)
    return detector, backbone


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the example; returns ``{"first_loss": ..., "last_loss": ...}`` (means over 3 steps)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fiber-tiny on 64x96 images: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3 tiny, 1e-4 full)")
    parser.add_argument("--weights", default=None, help="directory from fiber_backbones.save_pretrained")
    parser.add_argument("--variant", default="fine_v2", choices=["fine_v2", "fine_v3", "default"])
    parser.add_argument("--prompt", default=None, help="class prompt bound for the whole dataset (full size)")
    parser.add_argument("--tokenizer", default="roberta-base")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--min-size", type=int, default=800, help="FCOS resize: shorter side (full size)")
    parser.add_argument("--max-size", type=int, default=1333, help="FCOS resize: longer side cap (full size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.height, args.width = (64, 96) if args.tiny else (512, 640)
    lr = args.lr if args.lr is not None else (1e-3 if args.tiny else 1e-4)
    torch.manual_seed(0)
    if args.tiny:
        torch.set_num_threads(1)  # the tiny model is overhead-bound: extra threads only add contention

    detector, backbone = build(args)
    detector.to(args.device).train()
    if args.tiny:
        # random token ids in the tiny text tower's vocabulary: one prompt broadcast to every image
        prompt: TextInputs | None = TextInputs(torch.randint(3, 1000, (1, 6)), torch.ones(1, 6, dtype=torch.bool))
    elif args.prompt:
        prompt = tokenize_prompt(args.prompt, args.tokenizer)
    else:
        prompt = None
    images, targets = synthetic_rectangles(max(2 * args.batch_size, 8), args.height, args.width)
    images = [im.to(args.device) for im in images]
    targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]

    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=0.05)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        i = (step * args.batch_size) % len(images)
        batch = slice(i, i + args.batch_size)
        with backbone.bind_text(prompt):  # None: uni-modal Swin features
            parts = detector(images[batch], targets[batch])
        loss = sum(parts.values(), torch.zeros(()))  # a tensor start: the sum is a tensor for the type checker
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            detail = " ".join(f"{k}={v.item():.3f}" for k, v in parts.items())
            print(f"step {step:4d}  loss {loss.item():.3f}  ({detail})")
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.1f} s on {args.device}")
    if prompt is not None and backbone.last_output is not None and backbone.last_output.text is not None:
        print(f"text features of the last batch: {tuple(backbone.last_output.text.hidden.shape)}")

    detector.eval()
    with torch.no_grad(), backbone.bind_text(prompt):
        detections = detector(images[: args.batch_size])
    for j, det in enumerate(detections):
        top = det["scores"][:3].tolist()
        print(f"image {j}: {len(det['boxes'])} detections, top scores {[round(s, 3) for s in top]}")
    window = min(3, len(losses))
    return {"first_loss": statistics.mean(losses[:window]), "last_loss": statistics.mean(losses[-window:])}


if __name__ == "__main__":
    main()
