"""``fiber-train demo`` / ``python -m fiber_train.demo``: start the local web demo (issue 13).

Examples::

    fiber-train demo                                   # default tiny synthetic-world models (trained once, cached)
    fiber-train demo --checkpoint runs/fine-20261125-010000 --checkpoint runs/vqa-20261125-020000
    fiber-train demo --checkpoint runs/ --port 8080    # every finished run under runs/
"""

from __future__ import annotations

import argparse
import sys
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "build_parser", "main", "run"]

DESCRIPTION = """\
Serve a local web page (127.0.0.1 only) to try a FIBER model: upload or pick an image, choose a task (phrase
grounding, detection with class names, VQA, captioning, image-text scoring), see the result drawn on the image
and download it as JSON.

Each --checkpoint is a finished run directory (or its model/ folder, or a folder of runs); its task decides what
it serves: `fiber-train fine` -> grounding + detection, `coarse` -> image-text scoring, `finetune vqa` -> VQA,
`finetune caption` -> captioning. Without --checkpoint, tiny models are trained on the synthetic world the first
time (a few minutes on a CPU) and cached under --cache-dir.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fiber-train demo``."""
    p = argparse.ArgumentParser(
        prog="fiber-train demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``p`` (the ``demo`` sub-parser of ``fiber-train``, or a stand-alone parser)."""
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="run directory, model directory, or folder of runs (repeatable); default: the cached tiny models",
    )
    p.add_argument("--port", type=int, default=7860, help="TCP port on 127.0.0.1 (0: any free port; default 7860)")
    p.add_argument("--device", default="cpu", help="inference device (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--cache-dir", default=None, help="where the default models are trained and cached (default ~/.cache/fiber)"
    )
    p.add_argument("--default-steps", type=int, default=100, help="training steps of each default model (100)")
    p.add_argument("--samples", metavar="DIR", help="folder of example images offered on the page")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image file (10 MB)")
    p.add_argument("--max-megapixels", type=float, default=16.0, help="largest accepted image size (16 MP)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")


def _samples(args: argparse.Namespace, cache: Path, default: Sequence[Path]) -> list[Path]:
    if args.samples:
        folder = Path(args.samples)
        if not folder.is_dir():
            raise FileNotFoundError(f"--samples {folder}: not a directory")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:16]
    if default:
        return list(default)
    # a checkpoint without data: draw a few synthetic images (no training data, no tokenizer)
    from fiber_data import SyntheticWorldConfig, generate_world
    from fiber_train.demo.defaults import sample_images

    world = cache / "demo" / "samples"
    cfg = SyntheticWorldConfig(
        num_train=0, num_val=0, num_test=8, tokenizer_vocab_size=0, vqa_questions_per_image=0,
        nlvr2_statements_per_pair=0,
    )  # fmt: skip
    generate_world(world, cfg, progress=False)
    return sample_images(world)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fiber_train.demo``; serves until Ctrl-C and returns the exit code."""
    return run(build_parser().parse_args(list(argv) if argv is not None else None))


def run(args: argparse.Namespace) -> int:
    """Start the demo from parsed arguments (see :func:`add_arguments`); serves until Ctrl-C.

    Returns:
        0 after Ctrl-C, 2 when a checkpoint, the sample folder or the port is unusable.
    """
    from fiber_models.backends import load_backends
    from fiber_train.demo.defaults import DEFAULT_CACHE_DIR, TrainingInterrupted, display_path
    from fiber_train.demo.server import create_server, shorten_paths

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE_DIR
    server = None
    try:
        checkpoints: list[str | Path] = list(args.checkpoint)
        if checkpoints:
            backends = load_backends(checkpoints, device=args.device, samples=_samples(args, cache, ()))
            server = _create(create_server, backends, args)
        else:  # serve at once: the page shows the progress of the default models' first training
            server = _create(create_server, _training_placeholder(), args)
            server.start_background()
            print(f"FIBER demo on {server.url}  (Ctrl-C to stop)", flush=True)
            if args.open:
                webbrowser.open(server.url)
            backends = _train_defaults(server, cache, args)
    except (FileNotFoundError, ValueError, OSError, TrainingInterrupted) as exc:
        if server is not None:
            server.stop()
        print(f"fiber-train demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if server is not None:
            server.stop()
        print("stopping")
        return 0
    for m in backends.models:
        print(f"  model {m['task']:<8} {display_path(m['path'])}")
    for t in backends.info():
        state = "ready" if t["available"] else f"not available ({shorten_paths(t['reason'], backends)})"
        print(f"  {t['label']:<28} {state}")
    if server.training is not None:  # trained just now: swap the models in; the page reloads itself
        server.backends = backends
        server.training = None
        print("default models ready; the page now serves them", flush=True)
        return _wait(server)
    print(f"FIBER demo on {server.url}  (Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        server.server_close()
    return 0


def _create(create_server: Any, backends: Any, args: argparse.Namespace) -> Any:
    return create_server(
        backends,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        max_pixels=int(args.max_megapixels * 1e6),
        verbose=args.verbose,
    )


def _training_placeholder() -> Any:
    """Backends for the page while the default models train: every task unavailable, saying why."""
    from fiber_train.demo.backends import TASK_ORDER, BackendSet, UnavailableBackend

    reason = "the default models are being trained (first start only; progress at the top of the page)"
    return BackendSet({t: UnavailableBackend(t, reason, text_required=t != "caption") for t in TASK_ORDER})


def _train_defaults(server: Any, cache: Path, args: argparse.Namespace) -> Any:
    """Train (or load from the cache) the default models, publishing the progress on ``server.training``."""
    from fiber_train.demo.backends import load_backends
    from fiber_train.demo.defaults import ensure_default_models

    server.training = {"state": "training", "model": "", "index": 0, "models": 0, "step": 0, "steps": 0}

    def publish(progress: dict[str, Any]) -> None:
        server.training = {"state": "training", **progress}

    defaults = ensure_default_models(cache, steps=args.default_steps, on_progress=publish)
    server.training = {**server.training, "state": "loading"}
    return load_backends(list(defaults.run_dirs), device=args.device, samples=_samples(args, cache, defaults.samples))


def _wait(server: Any) -> int:
    """Serve (the server runs in a background thread) until Ctrl-C."""
    try:
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
