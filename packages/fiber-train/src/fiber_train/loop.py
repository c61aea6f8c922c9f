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
from fiber_train.tasks.base import BASELINE_PREFIX, StepOutput, TrainTask, as_train_task, baseline_lines
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
            set_epoch = getattr(dataset, "set_epoch", None)
            if isinstance(dataset, IterableDataset) and set_epoch is not None:
                set_epoch(self.epoch)  # streams reshuffle their shards per epoch
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
    backbones: list[Any] = [m for m in model.modules() if hasattr(m, "compile_blocks")]  # duck-typed backbones
    if trainer_cfg.activation_checkpointing:
        targets: list[Any] = [m for m in model.modules() if hasattr(m, "set_grad_checkpointing")]
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


def fit(task: TrainTask | Any, run_dir: Path, *, resume: bool = True, fabric: Fabric | None = None) -> FitResult:
    """Train ``task`` for ``config.trainer.max_steps`` optimiser steps, writing into ``run_dir``.

    ``Trainer(task, run_dir, resume=resume, fabric=fabric).fit()``; see :class:`Trainer` for the steps.

    Args:
        task: the training task (a :class:`fiber_train.tasks.base.TrainTask`; a plain class following the
            earlier probed protocol works too, see :class:`fiber_train.tasks.base.PlainTask`).
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
    return Trainer(task, run_dir, resume=resume, fabric=fabric).fit()


class Trainer:
    """The Fabric training loop, one named method per step.

    :meth:`fit` runs, in this order: :meth:`setup` (Fabric, run directory, threads, seeds, data preparation),
    :meth:`build_model` (model, speed settings, optimiser), :meth:`build_data` (dataset and sampler),
    :meth:`resume` (the newest checkpoint, when asked), :meth:`setup_training` (loader, Fabric wrapping,
    optimiser state), :meth:`start_logging` (config.yaml, loggers), :meth:`train_loop` (per step
    :meth:`training_step`, :meth:`clip_and_check`, :meth:`optimizer_step` or :meth:`skip_step`,
    :meth:`log_step`, periodic :meth:`evaluate` and :meth:`save`), then :meth:`finish` (final checkpoint,
    :meth:`export`, final evaluation). The task's hooks are called by name with what they need as arguments
    (:class:`fiber_train.tasks.base.TaskHooks` declares the optional ones with their defaults).

    Args: as :func:`fit`.
    """

    def __init__(
        self, task: TrainTask | Any, run_dir: Path, *, resume: bool = True, fabric: Fabric | None = None
    ) -> None:
        self.task: TrainTask = as_train_task(task)
        self.cfg = self.task.config
        self.tcfg = self.cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_requested = resume
        # None until setup() builds it: every later use runs after setup()
        self.fabric: Fabric = fabric  # pyright: ignore[reportAttributeAccessIssue]
        self.phase = "start-up"  # named in the message of a SIGTERM outside the training steps
        self.loggers: list[Any] = []  # the run's Fabric loggers (rank 0); closed as "failed" when the run fails
        # training state, advanced by the steps
        self.step = 0
        self.consumed = 0  # micro-batches consumed on this rank
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.skipped: dict[str, int] = {}
        self.repaired: dict[str, int] = {}
        self.preempted = False
        self.metrics: dict[str, float] = {}
        self.baseline: dict[str, float] = {}  # ``baseline/<key>`` evaluated before the first step (start_baseline)
        self.progress: Any = None
        self._sigterm: _SigtermFlag | None = None
        self._attention_reported = False

    # ------------------------------------------------------------------------------------------ the run

    def fit(self) -> FitResult:
        """Run every step (see the class docstring) under the run's log file and the SIGTERM policy."""
        with run_log(self.run_dir), sigterm_raises(self._sigterm_message):
            try:
                return self._fit()
            except BaseException:
                finalize_loggers(self.loggers, "failed")
                raise

    def _sigterm_message(self) -> str:
        run_dir = self.run_dir
        latest = latest_checkpoint(run_dir / "checkpoints") if run_dir.is_dir() else None
        if latest is None:
            return f"SIGTERM during {self.phase} of {run_dir}: no checkpoint was saved; run the command again"
        return (
            f"SIGTERM during {self.phase} of {run_dir}: the latest complete checkpoint is {latest}; "
            f"continue with the same command plus `--resume {run_dir}`"
        )

    def _fit(self) -> FitResult:
        t_start = time.perf_counter()
        self.setup()
        self.build_model()
        self.build_data()
        self.resume()
        self.setup_training()
        self.start_logging()
        self.evaluate_start_baseline()
        self.train_loop()
        if not self.preempted:
            self.finish()
        finalize_loggers(self.loggers, "preempted" if self.preempted else "success")
        return FitResult(
            run_dir=self.run_dir,
            step=self.step,
            metrics=self.metrics,
            preempted=self.preempted,
            nonfinite_steps=self.nonfinite_total,
            skipped_samples=self.skipped,
            repaired_records=self.repaired,
            seconds=time.perf_counter() - t_start,
        )

    # ---------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Fabric (built and launched unless given), the run directory, CPU threads, determinism, seeds, and the
        task's data preparation (rank 0 first)."""
        tcfg, run_dir, task = self.tcfg, self.run_dir, self.task
        if self.fabric is None:
            self.fabric = build_fabric(tcfg)
            self.fabric.launch()
        fabric = self.fabric
        if fabric.is_global_zero:
            check_output_dir(run_dir)  # creates it; CheckpointError names the directory (not a dir, read-only...)
        fabric.barrier()
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

    def build_model(self) -> None:
        """The task's model (``task.build_model(fabric)``), the disk check for its checkpoints, the speed
        settings, and (without FSDP) the optimiser and schedule."""
        tcfg, fabric = self.tcfg, self.fabric
        self.model: Any = self.task.build_model(fabric)
        if fabric.is_global_zero:  # a disk too small for the checkpoints fails now, not after hours of training
            check_output_dir(
                self.ckpt_root, (max(tcfg.keep_checkpoints, 1) + 1) * estimate_checkpoint_bytes(self.model)
            )
        speed = speed_setup(self.model, tcfg, fabric.device)
        self.fused = tcfg.fused_optimizer if tcfg.fused_optimizer is not None else fabric.device.type == "cuda"
        log.info(
            f"speed: compile={speed['compile']} ({speed['compiled_regions']} regions), "
            f"activation_checkpointing={speed['activation_checkpointing']}, fused_optimizer={self.fused}"
        )
        self.fsdp = is_fsdp(fabric)
        self.optimizer: Any  # the optimiser (wrapped by Fabric after setup_training)
        if not self.fsdp:  # FSDP replaces the parameters: its optimiser is built on the sharded model (setup_training)
            self.optimizer, self.scheduler = self.build_optimizer(self.model)

    def build_optimizer(self, module: torch.nn.Module) -> tuple[Any, Any]:
        """AdamW over ``task.param_groups(module)`` and the task's schedule (``task.build_scheduler``) or, when
        it has none, the one from ``config.optim``."""
        optimizer = build_optimizer(self.task.param_groups(module), self.cfg.optim, fused=self.fused)
        scheduler = self.task.build_scheduler(optimizer, self.tcfg.max_steps)  # e.g. fine: warm-up + multi-step
        if scheduler is None:
            scheduler = build_scheduler(optimizer, self.cfg.optim, self.tcfg.max_steps)
        return optimizer, scheduler

    def build_data(self) -> None:
        """The training dataset (``task.train_dataset(fabric)``) and, for a map-style one, the resumable sampler
        (``task.train_sampler`` or uniform)."""
        tcfg, fabric, task = self.tcfg, self.fabric, self.task
        self.dataset: Any = task.train_dataset(fabric)
        # records the loaders repaired or dropped while reading (e.g. detection boxes clipped): logged, never silent
        self.repaired = dict(task.data_report())
        batch_size = self.cfg.data.batch_size
        self.streaming = isinstance(self.dataset, IterableDataset)
        self.sampler: Any = None
        self.batches_per_epoch = 0
        if not self.streaming:
            rank, world = fabric.global_rank, fabric.world_size
            self.sampler = task.train_sampler(len(self.dataset), tcfg.seed, rank, world)
            if self.sampler is None:
                self.sampler = ResumableRandomSampler(len(self.dataset), seed=tcfg.seed, rank=rank, world_size=world)
            if len(self.sampler) < batch_size:
                raise ValueError(
                    f"training split has {len(self.dataset)} samples ({len(self.sampler)} per process), fewer than "
                    f"one batch of {batch_size}: lower data.batch_size or add data"
                )
            self.batches_per_epoch = len(self.sampler) // batch_size

    def resume(self) -> None:
        """With ``resume``: load the newest complete checkpoint (weights now, or after Fabric's set-up when
        sharded), the step and data position, the task's state and this rank's RNG; position the sampler."""
        self.ckpt = latest_checkpoint(self.ckpt_root) if self.resume_requested else None
        self.resume_state: dict[str, Any] | None = None
        self.sharded_ckpt = self.ckpt is not None and is_sharded_checkpoint(self.ckpt)
        if self.ckpt is not None:
            state, _meta = load_checkpoint(self.ckpt, None if self.sharded_ckpt and self.fsdp else self.model)
            self.resume_state = state
            self.step = int(state["step"])
            self.consumed = int(state["consumed"])
            if "task" in state:
                self.task.load_state_dict(state["task"])
            self.baseline = dict(state.get("baseline", {}))
            restore_rank_rng_state(state, self.fabric.global_rank)
            log.info(f"resumed from {self.ckpt} at step {self.step}")
        if self.sampler is not None:
            batch_size, per_epoch = self.cfg.data.batch_size, self.batches_per_epoch
            self.sampler.set_position(self.consumed // per_epoch, (self.consumed % per_epoch) * batch_size)

    def setup_training(self) -> None:
        """The data loader; the model and optimiser wrapped by Fabric (FSDP: the optimiser is built on the
        sharded model); the resumed optimiser and schedule state."""
        fabric, cfg = self.fabric, self.cfg
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.data.batch_size,
            sampler=self.sampler,
            collate_fn=self.task.collate_fn(),
            num_workers=cfg.data.num_workers,
            drop_last=True,
            persistent_workers=False,
            pin_memory=fabric.device.type == "cuda",
        )
        if self.fsdp:
            self.model = fabric.setup_module(self.model)
            self.optimizer, self.scheduler = self.build_optimizer(_unwrap(self.model))
            self.optimizer = fabric.setup_optimizers(self.optimizer)
        else:
            self.model, self.optimizer = fabric.setup(self.model, self.optimizer)
        if self.resume_state is not None:  # optimiser state after setup, so that it lands on the model's device
            if self.sharded_ckpt:
                assert self.ckpt is not None  # sharded_ckpt implies a checkpoint
                load_sharded(fabric, self.ckpt, self.model, self.optimizer)  # weights and optimiser shards
            else:
                load_full_optimizer_state(self.model, self.optimizer, self.resume_state["optimizer"])
            self.scheduler.load_state_dict(self.resume_state["scheduler"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def start_logging(self) -> None:
        """``config.yaml`` and the loggers (rank 0; on resume they drop what followed the step), the progress
        bar."""
        fabric, tcfg, cfg = self.fabric, self.tcfg, self.cfg
        if fabric.is_global_zero:
            import yaml

            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if fabric.is_global_zero:  # Fabric loggers (CSV, TensorBoard, ...); on resume they drop what followed `step`
            self.loggers += build_loggers(
                self.run_dir,
                tensorboard=tcfg.tensorboard,
                trackers=tcfg.loggers,
                task_name=self.task.name,
                resume_step=self.step,
                hyperparams=to_dict(cfg),
            )
        if tcfg.progress and fabric.is_global_zero:
            from tqdm.auto import tqdm

            self.progress = tqdm(
                total=tcfg.max_steps, initial=self.step, desc=f"{self.task.name}", dynamic_ncols=True, file=sys.stdout
            )

    # ------------------------------------------------------------------------------------------ training

    def _batches(self) -> _Batches:
        """Endless batches, positioned after what the interrupted run had consumed."""
        consumed, dataset = self.consumed, self.dataset
        positioned = self.streaming and consumed > 0 and getattr(dataset, "resampled", False)
        if positioned:  # an endless stream that can start at a position (fiber_data.formats.streaming): no re-reading
            dataset.set_resume_position(consumed, self.cfg.data.batch_size, self.cfg.data.num_workers)
            log.info(f"resuming the stream after {consumed} consumed micro-batches")
        batches = _Batches(self.loader)
        if self.streaming and consumed and not positioned:
            # a stream has no random access: skip what the interrupted run had consumed
            log.info(f"skipping {consumed} consumed micro-batches of the stream")
            batches.skip(consumed)
        return batches

    def train_loop(self) -> None:
        """Optimiser steps until ``trainer.max_steps``, early stopping or SIGTERM (checkpoint, ``preempted``)."""
        tcfg, cfg = self.tcfg, self.cfg
        self.batches = self._batches()
        self.window_t = time.perf_counter()
        self.window_samples = 0
        self.window_steps = 0
        self.model.train()
        with _SigtermFlag() as sigterm:
            self._sigterm = sigterm
            while self.step < tcfg.max_steps:
                loss_acc, logs_acc, finite_t = self.training_step()
                self._report_attention_once()
                grad_norm, finite = self.clip_and_check(finite_t)
                if not finite:
                    self.skip_step()
                    continue
                self.optimizer_step()
                step = self.step
                log_now = step % tcfg.log_every == 0 or step == tcfg.max_steps
                if self.progress is not None:
                    self.progress.update(1)
                if log_now:
                    self.log_step(loss_acc, logs_acc, grad_norm)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < tcfg.max_steps:
                    self.metrics = self.evaluate()
                    self.model.train()
                    if self.task.should_stop():  # early stopping (e.g. ODinW)
                        log.info(f"early stop at step {step}: the evaluation metric stopped improving")
                        break
                if tcfg.ckpt_every and step % tcfg.ckpt_every == 0 and step < tcfg.max_steps:
                    self.save(step)
                if sigterm.raised:
                    path = self.save(step)
                    log.warning(
                        f"SIGTERM received: saved {path}; continue with the same command plus `--resume {self.run_dir}`"
                    )
                    self.preempted = True
                    break
        if self.progress is not None:
            self.progress.close()

    def next_batch(self) -> Any:
        """The next non-empty micro-batch on the device, its randomness seeded by (seed, rank, position); counts
        the records the data pipeline skipped."""
        tcfg, sigterm = self.tcfg, self._sigterm
        empty_run = 0
        while True:
            torch.manual_seed(_step_seed(tcfg.seed, self.fabric.global_rank, self.consumed))
            batch = next(self.batches)
            self.consumed += 1
            for desc in getattr(batch, "skipped", ()):  # records the data pipeline skipped (on_error=skip)
                source = str(desc).split(":", 1)[0] or "data"
                self.skipped[source] = self.skipped.get(source, 0) + 1
            if len(batch) > 0:  # a batch whose every sample was skipped is an empty batch: take the next
                break
            empty_run += 1
            raised = sigterm is not None and sigterm.raised
            if empty_run >= tcfg.max_skipped_batches or raised:
                raise TrainingStopped(_skipped_everything_message(empty_run, self.skipped, batch, raised))
        return batch.to(self.fabric.device)

    def training_step(self) -> tuple[Any, dict[str, Any], torch.Tensor | None]:
        """Forward and backward of ``trainer.grad_accum`` micro-batches (gradient sync on the last only).

        Returns:
            ``(loss, logs, finite)``: the accumulated loss and logs (on the device: no host synchronisation per
            micro-batch) and a device bool, every loss finite.
        """
        tcfg, fabric, model = self.tcfg, self.fabric, self.model
        logs_acc: dict[str, Any] = {}
        loss_acc: Any = 0.0
        finite_t: torch.Tensor | None = None
        for micro in range(tcfg.grad_accum):
            # Randomness of a micro-batch (MLM masking in the collator with num_workers=0, dropout,
            # hard-negative draws) is a function of (seed, rank, position) only, so a resumed run
            # repeats exactly what an uninterrupted run would have done.
            batch = self.next_batch()
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
            self.window_samples += len(batch) * fabric.world_size
        return loss_acc, logs_acc, finite_t

    def _report_attention_once(self) -> None:
        if not self._attention_reported:
            self._attention_reported = True
            for entry in attention_report():  # each decision of the attention dispatcher, once per run
                log.info(f"attention {entry['backend']} for {entry['case']}: {entry['reason']}")

    def clip_and_check(self, finite_t: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """Clip the gradients (``trainer.grad_clip``) and read whether the losses and gradients are finite.

        Returns:
            ``(grad_norm, finite)``: the total norm before clipping (``None`` without clipping) and the step's
            one device -> host read.
        """
        grad_norm = None
        if self.tcfg.grad_clip > 0:  # the total norm it computes also tells whether every gradient is finite
            grad_norm = clip_gradients(self.fabric, self.model, self.optimizer, self.tcfg.grad_clip)
        if isinstance(grad_norm, torch.Tensor):
            grads_finite = torch.isfinite(grad_norm)
        else:
            grads_finite = _grads_finite(self.params, self.fabric)
        finite_t = grads_finite if finite_t is None else finite_t & grads_finite
        return grad_norm, bool(finite_t)

    def skip_step(self) -> None:
        """A step with non-finite losses or gradients: drop its gradients; under the ``trainer.nonfinite``
        policy (or after ``trainer.max_nonfinite`` in a row) save the last good state and stop."""
        tcfg = self.tcfg
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        msg = f"non-finite loss or gradients at step {self.step + 1} (total {self.nonfinite_total})"
        if tcfg.nonfinite == "stop" or self.nonfinite_run >= tcfg.max_nonfinite:
            path = self.save(self.step)
            raise TrainingStopped(f"{msg}; stopped by trainer.nonfinite policy, last good state saved in {path}")
        log.warning(f"{msg}; step skipped")

    def optimizer_step(self) -> None:
        """Optimiser and schedule step, then ``task.on_step_end(model, step)`` with the new step number."""
        self.nonfinite_run = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window_steps += 1
        self.task.on_step_end(self.model, self.step)

    def log_step(self, loss_acc: Any, logs_acc: Mapping[str, Any], grad_norm: torch.Tensor | None) -> None:
        """One metrics row: losses, lr per group, gradient norm, throughput, counts, fusion gates."""
        step, optimizer = self.step, self.optimizer
        loss_total = float(loss_acc)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{loss_total:.3f}")
        now = time.perf_counter()
        row = {
            "step": step,
            "loss": round(loss_total, 6),
            **{k: round(float(v), 6) for k, v in logs_acc.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": None if grad_norm is None else round(float(full_tensor(grad_norm)), 6),
            "samples_per_s": round(self.window_samples / max(now - self.window_t, 1e-9), 2),
            "step_time_s": round((now - self.window_t) / max(self.window_steps, 1), 4),
            "nonfinite_steps": self.nonfinite_total,
            **{f"skipped/{k}": v for k, v in self.skipped.items()},
            **{f"repaired/{k}": v for k, v in self.repaired.items()},
            **{k: round(v, 6) for k, v in gate_values(_unwrap(self.model)).items()},
        }
        for g in optimizer.param_groups:
            row[f"lr/{g.get('name', 'group')}"] = g["lr"]
        self.window_t, self.window_samples, self.window_steps = now, 0, 0
        log_metrics(self.loggers, row, step)

    # ------------------------------------------------------------------------- evaluation and checkpoints

    def evaluate_start_baseline(self) -> None:
        """Before the first step of a fresh run, when the task names ``start_baseline`` metrics: evaluate the
        model as it starts (logged at step 0) and keep each of those metrics as ``baseline/<key>``, reported
        with every later evaluation (and saved in the checkpoints for a resumed run). The task's state is put
        back afterwards, so this evaluation does not count for best-model selection or early stopping."""
        keys = self.task.start_baseline()
        if not keys or self.step > 0:
            return
        log.info(f"{self.task.name}: evaluating the model before training (the baseline of {', '.join(keys)})")
        state = self.task.state_dict()
        start = self.evaluate()
        if state is not None:
            self.task.load_state_dict(state)
        self.baseline = {BASELINE_PREFIX + k: float(start[k]) for k in keys if k in start}

    def evaluate(self) -> dict[str, float]:
        """``task.evaluate`` on the unwrapped model (no grad, autocast, FSDP unsharded), with the run's
        ``baseline/<key>`` metrics; rank 0 appends the metrics to ``eval.jsonl``, writes ``eval.json`` and logs
        them as ``eval/<name>`` at the step."""
        fabric, step = self.fabric, self.step
        module = _unwrap(self.model)
        module.eval()
        with torch.no_grad(), fabric.autocast(), unsharded(module):  # FSDP: evaluation calls non-forward methods
            result = self.task.evaluate(module, fabric)
        if result:
            result = {**result, **self.baseline}
        if fabric.is_global_zero and result:
            record = {"step": step, **result}
            with open(self.run_dir / "eval.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            (self.run_dir / "eval.json").write_text(json.dumps(record, indent=2))
            log_metrics(self.loggers, {f"eval/{k}": v for k, v in result.items()}, step)  # curves at their step
        return result

    def save(self, at_step: int) -> Path:
        """A crash-safe training checkpoint at ``at_step``: weights, optimiser, schedule, data position, RNG and
        the task's state (``task.state_dict()``); keeps the newest ``trainer.keep_checkpoints``."""
        state = {
            "scheduler": self.scheduler.state_dict(),
            "step": at_step,
            "consumed": self.consumed,
            "rng": capture_rng_state(),
        }
        task_state = self.task.state_dict()
        if task_state is not None:
            state["task"] = task_state
        if self.baseline:
            state["baseline"] = dict(self.baseline)
        return save_training_checkpoint(
            self.fabric,
            self.ckpt_root,
            at_step,
            self.model,
            self.optimizer,
            state,
            to_dict(self.cfg),
            keep=self.tcfg.keep_checkpoints,
            fsdp_checkpoint=self.tcfg.fsdp_checkpoint,
        )

    def export(self) -> None:
        """``task.export`` of a plain copy of the model (FSDP: gathered on rank 0) into ``run_dir/model``,
        written atomically."""
        fabric, task = self.fabric, self.task
        plain = full_model_copy(self.model, lambda: task.build_model(fabric), fabric.is_global_zero)
        if fabric.is_global_zero:
            assert plain is not None
            write_dir_atomically(self.run_dir / "model", lambda out: task.export(plain, out))
        fabric.barrier()

    def finish(self) -> None:
        """After training (not pre-empted): the final checkpoint, the export, the final evaluation, the plots."""
        self.phase = "the final checkpoint, export and evaluation"
        self.save(self.step)
        self.export()
        self.metrics = self.evaluate()
        if self.fabric.is_global_zero:
            for line in baseline_lines(self.task.name, self.metrics, self.task.baseline_name):
                log.info(line)
            plot_metrics(self.run_dir)


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


@contextlib.contextmanager
def _rank_zero_first(fabric: Fabric) -> Iterator[None]:
    if fabric.world_size > 1:
        with fabric.rank_zero_first():
            yield
    else:
        yield
