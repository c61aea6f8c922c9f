"""FSDP for the training loop: FSDP2 (``fully_shard``) through Fabric, and its checkpoints.

``trainer.strategy=fsdp`` builds Fabric's :class:`~lightning_fabric.strategies.ModelParallelStrategy` with a
one-dimensional (data-parallel) device mesh and :func:`shard_model` as its parallelisation: every item of every
``nn.ModuleList`` that holds parameters (Swin blocks and stages, RoBERTa layers, fusion layers, grounding-head
layers) becomes its own FSDP unit, innermost first, and the whole model the root unit. Parameters, gradients and
AdamW state are then sharded across the processes; ``fabric.no_backward_sync`` turns the reduce-scatter off on
the non-final micro-batches of gradient accumulation.

Checkpoints (``trainer.fsdp_checkpoint``) keep the atomic directory protocol of :mod:`fiber_train.checkpoint`:

- ``sharded``: every rank writes its shard through ``Fabric.save`` into ``<tmp>/sharded``; rank 0
  writes ``state.pt`` and ``meta.json`` and renames the directory into place. Resumable on another world size
  (torch distributed checkpoint reshards on load). Needs a file system shared by all ranks.
- ``full``: the full weights and optimiser state are gathered on rank 0 and written like a single-process
  checkpoint (``model.safetensors``; the optimiser state keyed by parameter name).

A checkpoint written by one strategy resumes under another (single process, DDP, FSDP full or sharded),
except that a sharded one needs ``strategy=fsdp``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import ModelParallelStrategy
from torch import nn

from fiber_train.checkpoint import SHARDED_DIR, capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = [
    "FSDP2Strategy",
    "build_strategy",
    "clip_gradients",
    "full_model_copy",
    "full_state_dicts",
    "full_tensor",
    "gather_rng_states",
    "is_fsdp",
    "load_full_optimizer_state",
    "load_sharded",
    "local_tensor",
    "restore_rank_rng_state",
    "save_sharded",
    "save_training_checkpoint",
    "shard_model",
    "shard_units",
    "unsharded",
]


class FSDP2Strategy(ModelParallelStrategy):
    """Fabric's FSDP2 strategy with a data-parallel mesh over all processes (no tensor parallelism)."""

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_fsdp(model_or_strategy: Any) -> bool:
    """Whether a Fabric (or its strategy, or a module) uses FSDP2 sharding."""
    if isinstance(model_or_strategy, Fabric):
        return isinstance(model_or_strategy.strategy, ModelParallelStrategy)
    if isinstance(model_or_strategy, nn.Module):
        return any(_is_fsdp_module(m) for m in model_or_strategy.modules())
    return isinstance(model_or_strategy, ModelParallelStrategy)


def build_strategy(trainer_cfg: Any) -> Any:
    """The Fabric strategy of ``trainer.strategy``: an :class:`FSDP2Strategy` for ``fsdp``, the name otherwise."""
    if trainer_cfg.strategy != "fsdp":
        return trainer_cfg.strategy
    if _fully_shard() is None:
        raise ImportError(
            f"trainer.strategy=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); torch "
            f"{torch.__version__} lacks it: upgrade torch or use trainer.strategy=ddp"
        )
    return FSDP2Strategy(
        parallelize_fn=shard_model,
        save_distributed_checkpoint=trainer_cfg.fsdp_checkpoint == "sharded",
    )


def _fully_shard() -> Callable[..., Any] | None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _is_fsdp_module(module: nn.Module) -> TypeGuard[FSDPModule]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules that become FSDP units: the items of the innermost ``nn.ModuleList`` s that hold
    parameters (transformer blocks and layers, called through their ``forward``), in module order.

    Items that hold a ``ModuleList`` themselves (a Swin stage) are not units: the backbone calls their parts
    (blocks, patch merging) directly, which FSDP's forward hooks of the stage would not see; their own
    parameters belong to the root unit.
    """
    units: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for child in m:
                nested = any(isinstance(c, nn.ModuleList) for c in child.modules())
                if not nested and next(child.parameters(), None) is not None:
                    units[id(child)] = child
    return list(units.values())


def shard_model(model: nn.Module, device_mesh: Any) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: one unit per :func:`shard_units` module, then the root.

    FSDP2 cannot shard 0-dimensional parameters (the ITC temperature): they stay replicated (``ignored_params``)
    and their gradients are averaged over the ranks by a hook after each accumulation into ``.grad``.
    """
    fully_shard = _fully_shard()
    assert fully_shard is not None
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    scalars = {p for p in model.parameters() if p.ndim == 0}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # every rank starts from rank 0's initial weights (as DDP does), not a mix of each rank's shard
        if mesh.device_type == "cuda":  # NCCL broadcasts device tensors; fully_shard would move them anyway
            model.to(torch.device("cuda", torch.cuda.current_device()))
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(t.data, src=0)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    return model


def _average_grad(p: torch.Tensor) -> None:
    """Average a replicated parameter's gradient over the ranks. Also right under gradient accumulation: the part
    accumulated before is already the same on every rank, so averaging again leaves it unchanged."""
    if p.grad is not None and torch.distributed.is_initialized():
        torch.distributed.all_reduce(p.grad)  # SUM (gloo has no AVG)
        p.grad.div_(torch.distributed.get_world_size())


def clip_gradients(fabric: Fabric, model: Any, optimizer: Any, max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm to ``max_norm``; returns the norm before clipping (the same on every rank).

    Without FSDP this is ``fabric.clip_gradients``. With FSDP the squared norms of the local gradient shards are
    summed over the ranks and those of the replicated (0-dimensional) parameters added once. Collective.
    """
    if not is_fsdp(fabric):
        norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        assert norm is not None  # Fabric returns the total norm when clipping by max_norm
        return norm
    fabric.strategy.precision.unscale_gradients(_raw_optimizer(optimizer))
    grads = [p.grad for p in _raw_module(model).parameters() if p.grad is not None]
    sharded = [local_tensor(g) for g in grads if g is not local_tensor(g)]
    replicated = [g for g in grads if g is local_tensor(g)]
    device = fabric.device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        total += g.detach().float().pow(2).sum()
    if fabric.world_size > 1:
        torch.distributed.all_reduce(total)
    for g in replicated:
        total += g.detach().float().pow(2).sum().to(device)
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in [*sharded, *replicated]:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return norm


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """All-gather every FSDP unit's parameters for the duration (evaluation calls methods other than ``forward``,
    which FSDP's hooks do not see); a no-op for a model without FSDP units. Collective: call on every rank."""
    units = [m for m in model.modules() if _is_fsdp_module(m)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard; ``t`` itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else t  # DTensor.to_local() is a Tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` (a DTensor gathered from every rank: collective; ``t`` itself otherwise)."""
    full = getattr(t, "full_tensor", None)
    return cast(torch.Tensor, full()) if callable(full) else t  # DTensor.full_tensor() is a Tensor


# ----------------------------------------------------------------------------------------------- checkpoints


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def _raw_module(model: Any) -> nn.Module:
    return getattr(model, "module", model)


def full_state_dicts(model: Any, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) model and optimiser state dicts, on CPU, on rank 0 (empty on other ranks).

    The optimiser state is keyed by parameter name (``{"state": {name: {...}}, "param_groups": [...]}``).
    Collective: call on every rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    module = _raw_module(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    optim = get_optimizer_state_dict(module, _raw_optimizer(optimizer), options=options)
    # full model state dicts hold tensors only; the optimiser's is a TypedDict (a plain dict at run time)
    return cast(dict[str, torch.Tensor], weights), cast(dict[str, Any], optim)


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimiser's order (the integer ids of ``optimizer.state_dict()``)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_full_optimizer_state(model: Any, optimizer: Any, state: Mapping[str, Any]) -> None:
    """Load an optimiser state dict into ``optimizer``, keyed by parameter name (a ``full`` FSDP checkpoint) or by
    integer id (``optimizer.state_dict()`` of a single-process or DDP run), sharding it when the model is."""
    module, optim = _raw_module(model), _raw_optimizer(optimizer)
    names = _param_names(module, optim)
    by_name = any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not is_fsdp(module):
        if by_name:  # names -> the optimiser's integer ids
            index = {n: i for i, n in enumerate(names)}
            state = {
                "state": {index[k]: v for k, v in state["state"].items()},
                "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]],
            }
        optim.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # integer ids -> names
        state = {
            "state": {names[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(module, optim, dict(state), options=StateDictOptions(full_state_dict=True))


def save_sharded(fabric: Fabric, tmp: Path, model: Any, optimizer: Any) -> None:
    """Write this rank's shard of the weights and optimiser state into ``tmp/sharded`` through Fabric
    (collective: every rank calls it; the path is rank 0's)."""
    fabric.save(Path(tmp) / SHARDED_DIR, {"model": model, "optimizer": optimizer})


def load_sharded(fabric: Fabric, ckpt: Path, model: Any, optimizer: Any) -> None:
    """Load the weights and optimiser state of a sharded checkpoint into the set-up (sharded) model and optimiser."""
    fabric.load(Path(ckpt) / SHARDED_DIR, {"model": model, "optimizer": optimizer}, weights_only=True)


# ------------------------------------------------------------------------------------------------------- RNG


def gather_rng_states(fabric: Fabric) -> list[dict[str, Any]]:
    """Every rank's RNG states (:func:`~fiber_train.checkpoint.capture_rng_state`), in rank order. Collective."""
    mine = capture_rng_state()
    if fabric.world_size == 1 or not torch.distributed.is_initialized():
        return [mine]
    out: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, mine)
    return out


def restore_rank_rng_state(state: Mapping[str, Any], rank: int) -> None:
    """Restore this rank's RNG states from a checkpoint's ``rng_ranks`` (rank 0's ``rng`` when absent)."""
    per_rank = state.get("rng_ranks") or []
    restore_rng_state(per_rank[rank] if rank < len(per_rank) else state["rng"])


# ------------------------------------------------------------------------------------------- the loop's save


def save_training_checkpoint(
    fabric: Fabric,
    ckpt_root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    state: dict[str, Any],
    config: Mapping[str, Any],
    *,
    keep: int,
    fsdp_checkpoint: str = "sharded",
) -> Path:
    """Save a checkpoint of the loop on every rank's behalf (call on every rank; returns the same path on all).

    ``state`` is the training state without the optimiser (scheduler, step, data position, RNG, task state).
    Single process and DDP: rank 0 writes the weights and ``optimizer.state_dict()``. FSDP: the full or the
    sharded layout (module docstring). The directory is written atomically by
    :func:`~fiber_train.checkpoint.save_checkpoint` on rank 0; every rank waits for it.
    """
    from fiber_train.checkpoint import checkpoint_name, save_checkpoint

    state = dict(state)
    if fabric.world_size > 1:
        state["rng_ranks"] = gather_rng_states(fabric)
    path = Path(ckpt_root) / checkpoint_name(step)
    if is_fsdp(fabric) and fsdp_checkpoint == "sharded":
        if fabric.is_global_zero:

            def write_shards(tmp: Path) -> None:
                save_sharded(fabric, tmp, model, optimizer)

            path = save_checkpoint(ckpt_root, step, None, state, config, keep=keep, write_shards=write_shards)
        else:
            save_sharded(fabric, Path(ckpt_root), model, optimizer)  # the path is rank 0's (broadcast)
    else:
        weights: Any
        if is_fsdp(fabric):
            weights, state["optimizer"] = full_state_dicts(model, optimizer)
        else:
            weights, state["optimizer"] = _raw_module(model), optimizer.state_dict()
        if fabric.is_global_zero:
            path = save_checkpoint(ckpt_root, step, weights, state, config, keep=keep)
    fabric.barrier()
    return path


def full_model_copy(model: Any, build: Callable[[], nn.Module], rank_zero: bool) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of an FSDP model on rank 0, built by ``build`` and loaded with the gathered
    weights (``None`` on the other ranks); the model itself when it is not sharded. Collective for FSDP."""
    module = _raw_module(model)
    if not is_fsdp(module):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rank_zero:
        return None
    plain = build()
    plain.load_state_dict(weights)
    return plain
