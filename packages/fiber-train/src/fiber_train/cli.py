"""``fiber-train``: the command-line entry point.

Every command is also callable from Python as ``main([...])`` (tests drive it that way).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fiber_train.config import ConfigError, list_recipes, load_config, to_dict
from fiber_train.stopping import Terminated, TrainingStopped, sigterm_raises

DESCRIPTION = """\
Train and evaluate FIBER models (Lightning Fabric).

Commands:
  coarse     coarse-grained pre-training (ITC + ITM with hard negatives + MLM) on image-text pairs.
             With no arguments it trains a tiny model on the embedded synthetic world (generated on first
             use under data/synthetic), on the CPU, and reports zero-shot retrieval recall.
  fine       fine-grained pre-training (grounding + detection, the detector head on the fused backbone).
             With no arguments it trains a tiny detector on the same synthetic world, on the CPU.
  finetune   fine-tune a downstream task (`fiber-train finetune --help` lists them).
  evaluate   re-run the evaluation of a finished run directory.
  convert    convert an official FIBER checkpoint into this project's layout (safetensors + report).
  predict    run a model on images (grounding, detection, VQA, caption, scoring) -> JSON + drawings.
  demo       a local web page to try a model (grounding, detection, VQA, captioning, scoring).
  plot       redraw loss_curve.png (losses and fusion gates) of a run directory.
  recipes    list the packaged recipes (use them with --recipe NAME).

Configuration: defaults < --recipe YAML < --set section.key=value overrides. Unknown keys are errors.
Errors end with one line naming the file, record or setting (exit code 2); --debug (or FIBER_DEBUG=1) shows
the traceback.
Examples:
  fiber-train coarse
  fiber-train coarse --set trainer.max_steps=50 data.batch_size=16
  fiber-train coarse --recipe coarse/fiber_b_4m --data /datasets/coco --set trainer.devices=8
  fiber-train coarse --resume runs/coarse-20261124-120000
"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe: a file path or a packaged name (see `fiber-train recipes`)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=1e-4 trainer.max_steps=100",
    )
    p.add_argument("--data", help="dataset directory (sets data.root; a non-synthetic folder sets data.format)")
    p.add_argument("--out", help="parent directory of run directories (sets trainer.out_dir)")
    p.add_argument("--run-name", help="run directory name (default: <task>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved config",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def build_parser() -> argparse.ArgumentParser:
    from fiber_train.tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="fiber-train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also FIBER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finetune_tasks = {n: s for n, s in TASKS.items() if s.stage == "finetune"}
    for name, spec in TASKS.items():
        if spec.stage != "pretrain":
            continue
        p = sub.add_parser(
            name,
            help=spec.help,
            description=f"{spec.help}. Default recipe: {spec.default_recipe} (tiny, synthetic, CPU).",
        )
        _add_run_args(p)
    if finetune_tasks:
        ft = sub.add_parser("finetune", help="fine-tune a downstream task", description="Fine-tune a downstream task.")
        ft_sub = ft.add_subparsers(dest="task", required=True, metavar="TASK")
        for name, spec in finetune_tasks.items():
            p = ft_sub.add_parser(
                name,
                help=spec.help,
                description=f"{spec.help}. Default recipe: {spec.default_recipe} (tiny, synthetic, CPU).",
            )
            _add_run_args(p)
    ev = sub.add_parser("evaluate", help="evaluate a finished run directory", description="Evaluate a run directory.")
    ev.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory written by fiber-train")
    ev.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    # `fiber-train convert ...` is dispatched to fiber_train.convert's own parser by main(); this entry is for
    # the command list of --help
    sub.add_parser("convert", help="convert an official FIBER checkpoint (.ckpt / .pth) to this project's layout")
    from fiber_train.demo.__main__ import DESCRIPTION as DEMO_DESCRIPTION
    from fiber_train.demo.__main__ import add_arguments as add_demo_arguments

    add_demo_arguments(
        sub.add_parser(
            "demo",
            help="local web demo of a model (127.0.0.1)",
            description=DEMO_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from fiber_train.predict_cli import DESCRIPTION as PREDICT_DESCRIPTION
    from fiber_train.predict_cli import add_arguments as add_predict_arguments

    add_predict_arguments(
        sub.add_parser(
            "predict",
            help="run a model on image files -> JSON (+ drawn boxes)",
            description=PREDICT_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    pl = sub.add_parser("plot", help="(re)draw loss_curve.png of a run", description="Plot losses and gates of a run.")
    pl.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory written by fiber-train")
    sub.add_parser("recipes", help="list packaged recipes")
    return parser


def _resolve_config(task: str, args: argparse.Namespace):
    from fiber_train.tasks import TASKS

    spec = TASKS[task]
    overrides = list(args.overrides)
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(
                f"--resume {args.resume}: no config.yaml there (is it a fiber-train run directory?)"
            )
        recipe: str | Path | None = saved
        if args.recipe:
            raise ConfigError("--resume uses the run's saved config; pass changes with --set, not --recipe")
    else:
        recipe = args.recipe or spec.default_recipe
    if args.data:
        overrides.insert(0, f"data.root={args.data}")
        if not (Path(args.data) / "world.json").is_file():
            overrides.insert(1, "data.format=coco-captions")
    if args.out:
        overrides.insert(0, f"trainer.out_dir={args.out}")
    if args.run_name:
        overrides.insert(0, f"trainer.run_name={args.run_name}")
    return load_config(spec.config, recipe, overrides)


def _run_task(task_name: str, args: argparse.Namespace) -> int:
    from fiber_train.tasks import TASKS

    cfg = _resolve_config(task_name, args)
    if args.print_config:  # fast: no torch import on this path
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from fiber_train.loop import fit

    task = TASKS[task_name].task(cfg)
    if args.resume:
        run_dir = Path(args.resume)
    else:
        name = cfg.trainer.run_name or f"{task_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.trainer.out_dir) / name
    result = fit(task, run_dir)
    _print_summary(task_name, result, _command_of(task_name))
    return 0


# what `fiber-train predict --task` a run of each training task can serve (absent: none)
_PREDICT_TASK = {
    "coarse": "scoring",
    "fine": "grounding",
    "grounding": "grounding",
    "refexp": "grounding",
    "detection": "detection",
    "vqa": "vqa",
    "caption": "caption",
}
_PREDICT_TEXT = {"scoring": "a red circle", "grounding": "the red circle", "detection": "red circle, blue square"}


def _command_of(task_name: str) -> str:
    """The command line words that run ``task_name`` (``coarse``, ``fine`` or ``finetune NAME``)."""
    from fiber_train.tasks import TASKS

    return task_name if TASKS[task_name].stage == "pretrain" else f"finetune {task_name}"


def _next_steps(task_name: str, command: str, run_dir: Path) -> list[str]:
    """The "next:" footer after a finished run: follow-ups that fit the task, one per line."""
    steps = [
        f"`fiber-train evaluate --run {run_dir}` re-scores it",
        f"`fiber-train {command} --set trainer.max_steps=N` trains longer",
    ]
    predict = _PREDICT_TASK.get(task_name)
    if predict is not None:
        text = {**_PREDICT_TEXT, "vqa": "what colour is the circle?"}.get(predict)
        shown = f' --text "{text}"' if text else ""
        steps.append(f"`fiber-train predict --checkpoint {run_dir} --task {predict}{shown} IMAGES --out DIR`")
        steps.append(f"`fiber-train demo --checkpoint {run_dir}` opens it in a browser")
    if task_name == "coarse":
        steps.append("`fiber-train fine`, `fiber-train finetune --help`: the next stages")
    elif task_name == "fine":
        steps.append("`fiber-train finetune detection|grounding|refexp --help`: fine-tune it for one task")
    steps.append("`fiber-eval --help` scores prediction files; README.md lists the recipes")
    return [("next: " if i == 0 else "      ") + step for i, step in enumerate(steps)]


def _print_summary(task_name: str, result, command: str | None = None) -> None:
    command = command or _command_of(task_name)
    print()
    status = "pre-empted (checkpoint saved)" if result.preempted else "finished"
    print(f"{task_name} {status}: {result.step} steps in {result.seconds / 60:.1f} min -> {result.run_dir}")
    if result.preempted:
        print(f"resume: `fiber-train {command} --resume {result.run_dir}` continues from the saved checkpoint")
    m = result.metrics
    if "t2i/R@1" in m:
        n_img = int(m.get("num_images", 0))
        chance = 100.0 / n_img if n_img else float("nan")
        print(
            f"zero-shot retrieval on {n_img} held-out images, {int(m.get('num_texts', 0))} captions "
            f"(chance R@1 = {chance:.1f}%):"
        )
        print("  image->text  R@1 {:5.1f}  R@5 {:5.1f}  R@10 {:5.1f}".format(m["i2t/R@1"], m["i2t/R@5"], m["i2t/R@10"]))
        print("  text->image  R@1 {:5.1f}  R@5 {:5.1f}  R@10 {:5.1f}".format(m["t2i/R@1"], m["t2i/R@5"], m["t2i/R@10"]))
    if "itm/acc" in m:
        _print_fusion(m)
    if m and "t2i/R@1" not in m:
        shown = {k: v for k, v in m.items() if isinstance(v, int | float)}
        print("evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in list(shown.items())[:12]))
    if result.skipped_samples:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped_samples.items()))
        print(f"skipped bad samples (data.on_error=skip): {counts}")
    if result.repaired_records:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.repaired_records.items()))
        print(f"repaired or dropped while loading (see the warnings above): {counts}")
    if result.nonfinite_steps:
        print(f"optimiser steps skipped for non-finite loss/gradients: {result.nonfinite_steps}")
    if not result.preempted:
        print(
            f"run directory: config.yaml, metrics.csv, loss_curve.png, eval.json, checkpoints/, model/ in {result.run_dir}"
        )
        for line in _next_steps(task_name, command, result.run_dir):
            print(line)


def _print_fusion(m: dict) -> None:
    """The coarse run's held-out proof of the fused path, each figure beside its baseline."""
    n = int(m.get("fusion/num_queries", 0))
    print(f"fused path on {n} held-out images (one query caption each):")
    print(
        f"  ITM accuracy, 1 positive : 2 ITC-hard negatives   {100 * m['itm/acc']:5.1f}%  (prior {100 * m['itm/prior']:.1f}%)"
    )
    print(
        f"  text->image R@1, ITC + ITM re-ranking          {m['t2i_rerank/R@1']:5.1f}   (ITC alone {m['t2i_itc/R@1']:.1f})"
    )
    print(
        f"  MLM accuracy on masked tokens                  {100 * m['mlm/acc']:5.1f}%  "
        f"(unigram baseline {100 * m['mlm/unigram_acc']:.1f}%)"
    )
    gates = {k[5:]: v for k, v in m.items() if k.startswith("gate/")}
    if gates:
        print("  gates: " + ", ".join(f"{k} {v:+.3f}" for k, v in gates.items()))


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch
    from lightning_fabric import Fabric

    from fiber_train.tasks import TASKS

    run = Path(args.run)
    saved = run / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{run}: no config.yaml (is it a fiber-train run directory?)")
    import yaml

    task_name = (yaml.safe_load(saved.read_text()) or {}).get("task", "coarse")
    if task_name not in TASKS:
        raise ConfigError(f"{saved}: unknown task {task_name!r}")
    spec = TASKS[task_name]
    pinned = [f"model.pretrained={run / 'model'}"]
    if (run / "model" / "tokenizer.json").is_file() and not any(
        o.startswith("data.tokenizer=") for o in args.overrides
    ):
        # the run's own tokenizer, also when --set data.root=OTHER points the evaluation at other data
        pinned.append(f"data.tokenizer={run / 'model'}")
    cfg = load_config(spec.config, saved, [*pinned, *args.overrides])
    if not (run / "model").is_dir():
        raise FileNotFoundError(f"{run / 'model'} not found: the run has not finished (resume it first)")
    task = spec.task(cfg)
    if hasattr(task, "run_dir"):
        task.run_dir = run
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision)
    model = task.build_model().to(fabric.device).eval()
    with torch.no_grad(), fabric.autocast():
        metrics = task.evaluate(model, fabric)
    print(json.dumps(metrics, indent=2))
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line: no ANSI colour codes, whitespace and newlines collapsed."""
    text = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
    return " ".join(text.split())


def _expected_error(exc: BaseException) -> tuple[str, int] | None:
    """``(prefix, exit code)`` for an error the user can fix from its message; ``None`` for a bug (traceback)."""
    from fiber_train.checkpoint import CheckpointError

    if isinstance(exc, TrainingStopped):
        # the non-finite policy, unusable data, SIGTERM outside training: the message names the latest checkpoint
        return "stopped", 3
    if isinstance(exc, CheckpointError):  # a full or unwritable output directory, a corrupt checkpoint
        return "error", 2
    expected: tuple[type[BaseException], ...] = (
        ConfigError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # full / read-only disk
        return "error", 2
    from fiber_data.errors import DataError, MissingExtraError

    expected += (DataError, MissingExtraError)
    modules = sys.modules
    if "fiber_backbones.convert" in modules:
        expected += (modules["fiber_backbones.convert"].CheckpointFormatError,)
    if "fiber_backbones.weights" in modules:
        weights = modules["fiber_backbones.weights"]
        expected += (weights.WeightsMismatchError, weights.WeightsFormatError)
    if isinstance(exc, expected):
        return "error", 2
    return None


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FIBER_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fiber-train``; returns the process exit code.

    An expected error (bad data, configuration, file, checkpoint, full disk) ends with one line naming the file,
    record or setting and what to do, and exit code 2 (3 when training stopped on purpose: the non-finite policy
    or unusable data; 143 for SIGTERM outside the training steps); ``--debug`` or ``FIBER_DEBUG=1`` shows the
    traceback instead.
    """
    args_list = list(argv) if argv is not None else sys.argv[1:]
    debug = _debug_requested(args_list)
    args_list = [a for a in args_list if a != "--debug"]
    try:
        if args_list[:1] == ["convert"]:  # its own parser: `fiber-train convert --help` and every option pass through
            with sigterm_raises("SIGTERM during `fiber-train convert`: nothing was written; run it again"):
                return _convert(args_list[1:])
        args = build_parser().parse_args(args_list)
        with sigterm_raises("SIGTERM during start-up: nothing was saved; run the command again"):
            return _dispatch(args)
    except Terminated as exc:
        print(f"fiber-train: {one_line(exc)}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a process killed by the signal
    except Exception as exc:
        kind = _expected_error(exc)
        if kind is None or debug:
            raise
        prefix, code = kind
        from fiber_data.errors import AnnotationError, ImageLoadError

        hint = ""
        if isinstance(exc, AnnotationError | ImageLoadError) and args_list[:1] != ["evaluate"]:
            hint = "; fix or remove that record, or skip bad records with --set data.on_error=skip"
        print(f"fiber-train: {prefix}: {one_line(exc)}{hint} (--debug shows the traceback)", file=sys.stderr)
        return code


def _convert(argv: list[str]) -> int:
    from fiber_train.convert import main as convert_main

    return convert_main(argv)


def _dispatch(args: argparse.Namespace) -> int:
    from fiber_train.logs import configure_logging  # light: no torch for --print-config

    configure_logging()  # progress and task messages of the library, on stderr (and in each run's run.log)
    if args.command == "recipes":
        print("\n".join(list_recipes()))
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "predict":
        from fiber_train.predict_cli import run as predict_run

        return predict_run(args)
    if args.command == "demo":
        from fiber_train.demo.__main__ import run as demo_run

        return demo_run(args)
    if args.command == "plot":
        from fiber_train.loop import plot_metrics

        out = plot_metrics(Path(args.run))
        if out is None:
            print(f"fiber-train: nothing to plot in {args.run} (no metrics.csv, or matplotlib missing)")
            return 1
        print(out)
        return 0
    return _run_task(args.task if args.command == "finetune" else args.command, args)


if __name__ == "__main__":
    raise SystemExit(main())
