"""The generic Lightning Fabric training loop shared by every task.

Responsibilities: devices/precision/strategy through Fabric, gradient accumulation with ``no_backward_sync``,
clipping, the step-level schedule, non-finite guards, metrics CSV, progress bar, crash-safe checkpoints with
exact resume (model, optimiser, scheduler, RNG, data position), SIGTERM -> checkpoint and clean exit, and a
final export + evaluation. Tasks (``fiber_train.tasks``) provide the model, data and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader, IterableDataset

from fiber_backbones.attention import attention_report
from fiber_train.checkpoint import (
    atomic_write_text,
    capture_rng_state,
    check_output_dir,
    estimate_checkpoint_bytes,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    write_dir_atomically,
)
from fiber_train.config import to_dict
from fiber_train.distributed import (
    build_strategy,
    clip_gradients,
    full_model_copy,
    full_tensor,
    is_fsdp,
    load_full_optimizer_state,
    load_sharded,
    local_tensor,
    restore_rank_rng_state,
    save_training_checkpoint,
    unsharded,
)
from fiber_train.optim import build_optimizer, build_scheduler
from fiber_train.sampling import ResumableRandomSampler
from fiber_train.stopping import TrainingStopped, sigterm_raises
from fiber_train.tasks.base import StepOutput, TrainTask
from fiber_train.tracking import build_loggers, finalize_loggers, log_metrics, plot_metrics, run_log

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Summary of a finished (or pre-empted) run."""

    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False
    nonfinite_steps: int = 0
    skipped_samples: dict[str, int] = field(default_factory=dict)
    repaired_records: dict[str, int] = field(default_factory=dict)  # "<source>/<kind>" -> count (task.data_report)
    seconds: float = 0.0


def build_fabric(trainer_cfg: Any) -> Fabric:
    """A Fabric from the ``trainer`` section (accelerator, devices, num_nodes, strategy, precision); ``strategy:
    fsdp`` is FSDP2 (:func:`fiber_train.distributed.build_strategy`)."""
    return Fabric(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        precision=trainer_cfg.precision,
    )


def cpu_threads(setting: int, local_processes: int = 1) -> int:
    """Number of torch CPU threads for one training process (the ``trainer.threads`` setting resolved).

    Args:
        setting: ``trainer.threads``; a positive value is returned as is.
        local_processes: training processes on this node, which share its cores.

    Returns:
        ``setting`` when positive; else ``OMP_NUM_THREADS`` when set to a positive integer; else the number of
        cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where the OS has no affinity)
        divided by ``local_processes``, at least 1.
    """
    if setting > 0:
        return setting
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        usable = os.cpu_count() or 1
    return max(1, usable // max(local_processes, 1))


def gate_values(model: torch.nn.Module) -> dict[str, float]:
    """Current value of every trainable fusion gate, as ``{"gate/<layer>": value}`` (logged per step).

    A gate is a parameter named ``alpha_i2t`` / ``alpha_t2i`` (the zero-initialised scalars of the fusion
    schedule); the key is its module path without the ``backbone.`` prefix and encoder names.
    """
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and name.rsplit(".", 1)[-1] in ("alpha_i2t", "alpha_t2i"):
            short = name.replace("backbone.", "").replace("image_encoder.layers.", "img.s")
            short = short.replace("text_encoder.encoder.layer.", "txt.l").replace(".blocks.", ".b")
            short = short.replace(".attn.alpha_i2t", ".i2t").replace(".alpha_t2i", ".t2i")
            out[f"gate/{short}"] = float(full_tensor(p.detach()).float().reshape(-1)[0])  # FSDP: collective
    return out


class _SigtermFlag:
    """Turns SIGTERM (SLURM pre-emption) into a flag the loop checks after each optimiser step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Batches:
    """Endless batches from ``loader`` (the sampler advances its own epoch at the end of each pass).

    The first iterator is created eagerly: creating one draws from the global RNG (the workers' base seed),
    which must happen outside the per-micro-batch seeding so that a resumed run draws what the original did.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.epoch = 0
        self.it: Iterator[Any] = iter(loader)

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            dataset = self.loader.dataset
            if isinstance(dataset, IterableDataset) and hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)  # streams reshuffle their shards per epoch
            self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:  # a whole pass without one batch: looping again would never end
                raise TrainingStopped(
                    f"the training data yielded no batch in a whole pass (epoch {self.epoch}): every sample was "
                    "skipped (data.on_error=skip drops bad stream samples) or there are fewer samples than one batch "
                    "(data.batch_size); check the data with `fiber-data verify`"
                ) from None

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self)


def _step_seed(seed: int, rank: int, consumed: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + consumed) % (2**63 - 1)


def _grads_finite(params: list[torch.nn.Parameter], fabric: Fabric) -> torch.Tensor:
    """Device bool: every gradient is finite, without a host synchronisation. With FSDP each rank checks its
    shard and the ranks agree (collective: every rank calls it)."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        finite = torch.isfinite(torch.stack([n.float().to(fabric.device) for n in norms]).sum())
    else:
        finite = torch.ones((), dtype=torch.bool, device=fabric.device)
    if is_fsdp(fabric) and fabric.world_size > 1:
        flag = finite.to(fabric.device, torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag[0] > 0
    return finite


def speed_setup(model: torch.nn.Module, trainer_cfg: Any, device: torch.device) -> dict[str, Any]:
    """Apply the trainer's speed settings to ``model`` in place (before Fabric wraps it).

    ``trainer.compile`` (``None``: on for CUDA) compiles each backbone's blocks (regional compile,
    :meth:`fiber_backbones.FiberBackbone.compile_blocks`); ``trainer.activation_checkpointing`` turns on the
    backbones' block recomputation. A backbone is any sub-module with ``compile_blocks`` /
    ``set_grad_checkpointing``.

    Returns:
        What was done: ``{"compile": bool, "compiled_regions": int, "activation_checkpointing": bool}``.

    Raises:
        ValueError: ``trainer.compile=true`` or ``trainer.activation_checkpointing=true`` on a model without such
            a backbone.
    """
    compile_on = trainer_cfg.compile if trainer_cfg.compile is not None else device.type == "cuda"
    info: dict[str, Any] = {"compile": False, "compiled_regions": 0, "activation_checkpointing": False}
    backbones = [m for m in model.modules() if hasattr(m, "compile_blocks")]
    if trainer_cfg.activation_checkpointing:
        targets = [m for m in model.modules() if hasattr(m, "set_grad_checkpointing")]
        if not targets:
            raise ValueError("trainer.activation_checkpointing=true, but the model has no backbone that supports it")
        for m in targets:
            m.set_grad_checkpointing(True)
        info["activation_checkpointing"] = True
    if compile_on:
        if not backbones and trainer_cfg.compile:
            raise ValueError("trainer.compile=true, but the model has no backbone with compile_blocks()")
        for m in backbones:
            info["compiled_regions"] += m.compile_blocks(**dict(trainer_cfg.compile_options))
        info["compile"] = bool(backbones)
    return info


def fit(task: TrainTask, run_dir: Path, *, resume: bool = True, fabric: Fabric | None = None) -> FitResult:
    """Train ``task`` for ``config.trainer.max_steps`` optimiser steps, writing into ``run_dir``.

    Args:
        task: the training task.
        run_dir: run directory (created); holds ``config.yaml``, ``metrics.csv`` (and the TensorBoard events in
            ``tensorboard/``), ``run.log`` (the run's log messages), ``checkpoints/``, ``model/`` (exported
            weights), ``eval.json``.
        resume: continue from the newest complete checkpoint in ``run_dir`` when there is one.
        fabric: an already launched Fabric (default: built from ``config.trainer`` and launched).

    Returns:
        A :class:`FitResult` with the final metrics.

    Raises:
        TrainingStopped: the non-finite policy stopped the run (a checkpoint was saved first), or
            ``trainer.max_skipped_batches`` consecutive batches had every sample skipped (``data.on_error=skip``
            with unusable data).
        Terminated: SIGTERM arrived during start-up or the final export/evaluation (SIGTERM during training
            saves a checkpoint and returns with ``preempted=True``).
    """
    run_dir = Path(run_dir)
    phase = {"now": "start-up"}
    loggers: list[Any] = []  # the run's Fabric loggers (rank 0), filled by _fit; closed here when the run fails

    def on_sigterm() -> str:
        latest = latest_checkpoint(run_dir / "checkpoints") if run_dir.is_dir() else None
        if latest is None:
            return f"SIGTERM during {phase['now']} of {run_dir}: no checkpoint was saved; run the command again"
        return (
            f"SIGTERM during {phase['now']} of {run_dir}: the latest complete checkpoint is {latest}; "
            f"continue with the same command plus `--resume {run_dir}`"
        )

    with run_log(run_dir), sigterm_raises(on_sigterm):
        try:
            return _fit(task, run_dir, resume=resume, fabric=fabric, phase=phase, loggers=loggers)
        except BaseException:
            finalize_loggers(loggers, "failed")
            raise


def _fit(
    task: TrainTask,
    run_dir: Path,
    *,
    resume: bool,
    fabric: Fabric | None,
    phase: dict[str, str],
    loggers: list[Any],
) -> FitResult:
    cfg = task.config
    tcfg = cfg.trainer
    t_start = time.perf_counter()
    if fabric is None:
        fabric = build_fabric(tcfg)
        fabric.launch()
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    if fabric.is_global_zero:
        check_output_dir(run_dir)  # creates it; CheckpointError names the directory (not a dir, read-only...)
    fabric.barrier()
    if hasattr(task, "run_dir"):
        task.run_dir = run_dir  # tasks write prediction files (VQA submission, captions, NLVR2) here
    torch.set_num_threads(cpu_threads(tcfg.threads, max(1, fabric.world_size // max(tcfg.num_nodes, 1))))
    log.info(
        "%s: %d steps into %s (%d processes, %d CPU threads each)",
        task.name,
        tcfg.max_steps,
        run_dir,
        fabric.world_size,
        torch.get_num_threads(),
    )
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True)
    fabric.seed_everything(tcfg.seed + fabric.global_rank, workers=True, verbose=False)

    with _rank_zero_first(fabric):
        task.prepare_data()
    if hasattr(task, "attach_fabric"):
        task.attach_fabric(fabric)
    model = task.build_model()
    if fabric.is_global_zero:  # a disk too small for the checkpoints fails now, not after hours of training
        check_output_dir(ckpt_root, (max(tcfg.keep_checkpoints, 1) + 1) * estimate_checkpoint_bytes(model))
    speed = speed_setup(model, tcfg, fabric.device)
    fused = tcfg.fused_optimizer if tcfg.fused_optimizer is not None else fabric.device.type == "cuda"
    log.info(
        f"speed: compile={speed['compile']} ({speed['compiled_regions']} regions), "
        f"activation_checkpointing={speed['activation_checkpointing']}, fused_optimizer={fused}"
    )
    fsdp = is_fsdp(fabric)

    def build_optim(module: torch.nn.Module) -> tuple[Any, Any]:
        optimizer = build_optimizer(task.param_groups(module), cfg.optim, fused=fused)
        if hasattr(task, "build_scheduler"):  # a task with its own schedule (e.g. fine: warm-up + multi-step)
            return optimizer, task.build_scheduler(optimizer, tcfg.max_steps)
        return optimizer, build_scheduler(optimizer, cfg.optim, tcfg.max_steps)

    if not fsdp:  # FSDP replaces the parameters: its optimiser is built on the sharded model (below)
        optimizer, scheduler = build_optim(model)

    dataset = task.train_dataset()
    # records the loaders repaired or dropped while reading (e.g. detection boxes clipped): logged, never silent
    repaired = dict(task.data_report()) if hasattr(task, "data_report") else {}
    batch_size = cfg.data.batch_size
    streaming = isinstance(dataset, IterableDataset)
    sampler: Any = None
    batches_per_epoch = 0
    if not streaming:
        rank, world = fabric.global_rank, fabric.world_size
        if hasattr(task, "train_sampler"):
            sampler = task.train_sampler(len(dataset), tcfg.seed, rank, world)
        if sampler is None:
            sampler = ResumableRandomSampler(len(dataset), seed=tcfg.seed, rank=rank, world_size=world)
        if len(sampler) < batch_size:
            raise ValueError(
                f"training split has {len(dataset)} samples ({len(sampler)} per process), fewer than one batch of "
                f"{batch_size}: lower data.batch_size or add data"
            )
        batches_per_epoch = len(sampler) // batch_size

    step = 0
    consumed = 0  # micro-batches consumed on this rank
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    resume_state: dict[str, Any] | None = None
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)
    if ckpt is not None:
        state, _meta = load_checkpoint(ckpt, None if sharded_ckpt and fsdp else model)  # sharded: after setup
        resume_state = state
        step = int(state["step"])
        consumed = int(state["consumed"])
        if "task" in state and hasattr(task, "load_state_dict"):
            task.load_state_dict(state["task"])
        restore_rank_rng_state(state, fabric.global_rank)
        log.info(f"resumed from {ckpt} at step {step}")
    if sampler is not None:
        sampler.set_position(consumed // batches_per_epoch, (consumed % batches_per_epoch) * batch_size)

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=task.collate_fn(),
        num_workers=cfg.data.num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=fabric.device.type == "cuda",
    )
    if fsdp:
        model = fabric.setup_module(model)
        optimizer, scheduler = build_optim(_unwrap(model))
        optimizer = fabric.setup_optimizers(optimizer)
    else:
        model, optimizer = fabric.setup(model, optimizer)
    if resume_state is not None:  # optimiser state after setup, so that it lands on the model's device
        if sharded_ckpt:
            load_sharded(fabric, ckpt, model, optimizer)  # weights and optimiser shards
        else:
            load_full_optimizer_state(model, optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    params = [p for p in model.parameters() if p.requires_grad]

    if fabric.is_global_zero:
        import yaml

        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if fabric.is_global_zero:  # Fabric loggers (CSV, TensorBoard, ...); on resume they drop what followed `step`
        loggers += build_loggers(
            run_dir,
            tensorboard=tcfg.tensorboard,
            trackers=tcfg.loggers,
            task_name=task.name,
            resume_step=step,
            hyperparams=to_dict(cfg),
        )

    def save(at_step: int) -> Path:
        state = {
            "scheduler": scheduler.state_dict(),
            "step": at_step,
            "consumed": consumed,
            "rng": capture_rng_state(),
        }
        if hasattr(task, "state_dict"):
            state["task"] = task.state_dict()
        return save_training_checkpoint(
            fabric,
            ckpt_root,
            at_step,
            model,
            optimizer,
            state,
            to_dict(cfg),
            keep=tcfg.keep_checkpoints,
            fsdp_checkpoint=tcfg.fsdp_checkpoint,
        )

    progress = None
    if tcfg.progress and fabric.is_global_zero:
        from tqdm.auto import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=step, desc=f"{task.name}", dynamic_ncols=True, file=sys.stdout)

    positioned = streaming and consumed > 0 and getattr(dataset, "resampled", False)
    if positioned:  # an endless stream that can start at a position (fiber_data.streaming): no re-reading
        dataset.set_resume_position(consumed, batch_size, cfg.data.num_workers)
        log.info(f"resuming the stream after {consumed} consumed micro-batches")
    batches = _Batches(loader)
    if streaming and consumed and not positioned:
        # a stream has no random access: skip what the interrupted run had consumed
        log.info(f"skipping {consumed} consumed micro-batches of the stream")
        batches.skip(consumed)
    nonfinite_total = 0
    nonfinite_run = 0
    skipped: dict[str, int] = {}
    preempted = False
    window_t = time.perf_counter()
    window_samples = 0
    window_steps = 0
    result_metrics: dict[str, float] = {}
    model.train()
    attention_reported = False
    with _SigtermFlag() as sigterm:
        while step < tcfg.max_steps:
            # losses and logs stay on the device (no host synchronisation per micro-batch); they are read at
            # log steps only. The one read per optimiser step is the finiteness flag of the non-finite policy.
            logs_acc: dict[str, Any] = {}
            loss_acc: Any = 0.0
            finite_t: torch.Tensor | None = None
            for micro in range(tcfg.grad_accum):
                # Randomness of a micro-batch (MLM masking in the collator with num_workers=0, dropout,
                # hard-negative draws) is a function of (seed, rank, position) only, so a resumed run
                # repeats exactly what an uninterrupted run would have done.
                empty_run = 0
                while True:
                    torch.manual_seed(_step_seed(tcfg.seed, fabric.global_rank, consumed))
                    batch = next(batches)
                    consumed += 1
                    for desc in getattr(batch, "skipped", ()):  # records the data pipeline skipped (on_error=skip)
                        source = str(desc).split(":", 1)[0] or "data"
                        skipped[source] = skipped.get(source, 0) + 1
                    if len(batch) > 0:  # a batch whose every sample was skipped is an empty batch: take the next
                        break
                    empty_run += 1
                    if empty_run >= tcfg.max_skipped_batches or sigterm.raised:
                        raise TrainingStopped(_skipped_everything_message(empty_run, skipped, batch, sigterm.raised))
                batch = batch.to(fabric.device)
                is_last = micro == tcfg.grad_accum - 1
                with fabric.no_backward_sync(model, enabled=not is_last):
                    out: StepOutput = model(batch)
                    loss_finite = torch.isfinite(out.loss.detach())
                    finite_t = loss_finite if finite_t is None else finite_t & loss_finite
                    fabric.backward(out.loss / tcfg.grad_accum)
                loss_acc = loss_acc + out.loss.detach() / tcfg.grad_accum
                for k, v in out.logs.items():
                    v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / tcfg.grad_accum
                window_samples += len(batch) * fabric.world_size
            if not attention_reported:
                attention_reported = True
                for entry in attention_report():  # each decision of the attention dispatcher, once per run
                    log.info(f"attention {entry['backend']} for {entry['case']}: {entry['reason']}")
            grad_norm = None
            if tcfg.grad_clip > 0:  # the total norm it computes also tells whether every gradient is finite
                grad_norm = clip_gradients(fabric, model, optimizer, tcfg.grad_clip)
            if isinstance(grad_norm, torch.Tensor):
                grads_finite = torch.isfinite(grad_norm)
            else:
                grads_finite = _grads_finite(params, fabric)
            finite_t = grads_finite if finite_t is None else finite_t & grads_finite
            finite = bool(finite_t)  # the step's one device -> host read
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                nonfinite_total += 1
                nonfinite_run += 1
                msg = f"non-finite loss or gradients at step {step + 1} (total {nonfinite_total})"
                if tcfg.nonfinite == "stop" or nonfinite_run >= tcfg.max_nonfinite:
                    path = save(step)
                    raise TrainingStopped(
                        f"{msg}; stopped by trainer.nonfinite policy, last good state saved in {path}"
                    )
                log.warning(f"{msg}; step skipped")
                continue
            nonfinite_run = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            if hasattr(task, "on_step_end"):
                task.on_step_end(model, step)
            log_now = step % tcfg.log_every == 0 or step == tcfg.max_steps
            if progress is not None:
                progress.update(1)
            if log_now:
                loss_total = float(loss_acc)
                if progress is not None:
                    progress.set_postfix(loss=f"{loss_total:.3f}")
                now = time.perf_counter()
                row = {
                    "step": step,
                    "loss": round(loss_total, 6),
                    **{k: round(float(v), 6) for k, v in logs_acc.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": None if grad_norm is None else round(float(full_tensor(grad_norm)), 6),
                    "samples_per_s": round(window_samples / max(now - window_t, 1e-9), 2),
                    "step_time_s": round((now - window_t) / max(window_steps, 1), 4),
                    "nonfinite_steps": nonfinite_total,
                    **{f"skipped/{k}": v for k, v in skipped.items()},
                    **{f"repaired/{k}": v for k, v in repaired.items()},
                    **{k: round(v, 6) for k, v in gate_values(_unwrap(model)).items()},
                }
                for g in optimizer.param_groups:
                    row[f"lr/{g.get('name', 'group')}"] = g["lr"]
                window_t, window_samples, window_steps = now, 0, 0
                log_metrics(loggers, row, step)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < tcfg.max_steps:
                result_metrics = _evaluate(task, model, fabric, run_dir, step, loggers)
                model.train()
                if hasattr(task, "should_stop") and task.should_stop():  # early stopping (e.g. ODinW)
                    log.info(f"early stop at step {step}: the evaluation metric stopped improving")
                    break
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.max_steps:
                save(step)
            if sigterm.raised:
                path = save(step)
                log.warning(f"SIGTERM received: saved {path}; continue with the same command plus `--resume {run_dir}`")
                preempted = True
                break
    if progress is not None:
        progress.close()
    if not preempted:
        phase["now"] = "the final checkpoint, export and evaluation"
        save(step)
        plain = full_model_copy(model, task.build_model, fabric.is_global_zero)  # FSDP: gathered on rank 0
        if fabric.is_global_zero:
            assert plain is not None
            write_dir_atomically(run_dir / "model", lambda out: task.export(plain, out))
        fabric.barrier()
        result_metrics = _evaluate(task, model, fabric, run_dir, step, loggers)
        if fabric.is_global_zero:
            plot_metrics(run_dir)
    finalize_loggers(loggers, "preempted" if preempted else "success")
    return FitResult(
        run_dir=run_dir,
        step=step,
        metrics=result_metrics,
        preempted=preempted,
        nonfinite_steps=nonfinite_total,
        skipped_samples=skipped,
        repaired_records=repaired,
        seconds=time.perf_counter() - t_start,
    )


def _skipped_everything_message(empty: int, skipped: Mapping[str, int], batch: Any, sigterm: bool) -> str:
    """One line for a run whose data policy skipped every sample of ``empty`` consecutive batches."""
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none counted"
    last = list(getattr(batch, "skipped", ()))
    example = f"; last skipped record {last[-1]}" if last else ""
    if sigterm:
        return (
            f"SIGTERM while every sample was being skipped ({empty} empty batches in a row; skipped per source: "
            f"{counts}{example}); no checkpoint was saved for this step"
        )
    return (
        f"data.on_error=skip skipped every sample of {empty} consecutive batches (skipped per source: {counts}"
        f"{example}): the data cannot be read as configured; check data.root and the image folder with "
        "`fiber-data verify`, or raise trainer.max_skipped_batches"
    )


def _unwrap(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)


def _evaluate(
    task: TrainTask, model: Any, fabric: Fabric, run_dir: Path, step: int, loggers: list[Any] | None = None
) -> dict[str, float]:
    module = _unwrap(model)
    module.eval()
    with torch.no_grad(), fabric.autocast(), unsharded(module):  # FSDP: evaluation calls non-forward methods
        result = task.evaluate(module, fabric)
    if fabric.is_global_zero and result:
        record = {"step": step, **result}
        with open(run_dir / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        (run_dir / "eval.json").write_text(json.dumps(record, indent=2))
        log_metrics(loggers or [], {f"eval/{k}": v for k, v in result.items()}, step)  # curves at their step
    return result


@contextlib.contextmanager
def _rank_zero_first(fabric: Fabric) -> Iterator[None]:
    if fabric.world_size > 1:
        with fabric.rank_zero_first():
            yield
    else:
        yield
