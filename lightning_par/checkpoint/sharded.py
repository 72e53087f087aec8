"""Saving and loading sharded checkpoints: every rank its own shards, atomic renames, resharding loads."""

from __future__ import annotations

import pickle
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_par.checkpoint.async_save import AsyncShardedSaver
from lightning_par.checkpoint.safe import (
    META_FILE,
    OPTIM_PREFIX,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    read_meta,
    resolve,
)

# ---- what goes into a checkpoint ----------------------------------------------------------------------
# ---- asynchronous saves ---------------------------------------------------------------------------------
_ASYNC_SAVER: ContextVar[AsyncShardedSaver | None] = ContextVar("lightning_par_async_saver", default=None)


@contextmanager
def async_saves(saver: AsyncShardedSaver) -> Iterator[None]:
    """Within this block :func:`save_sharded` (hence the strategy's ``save_checkpoint``) goes through ``saver``."""
    token = _ASYNC_SAVER.set(saver)
    try:
        yield
    finally:
        _ASYNC_SAVER.reset(token)


def optimizer_tensors(module: nn.Module, optimizers: Iterable[Optimizer]) -> dict[str, Tensor]:
    """Optimizer state tensors by ``optim.<i>.state.<parameter name>.<key>`` (layout-free names)."""
    names = {id(p): n for n, p in module.named_parameters()}
    out: dict[str, Tensor] = {}
    for i, opt in enumerate(optimizers):
        for p, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    out[f"{OPTIM_PREFIX}.{i}.state.{names[id(p)]}.{key}"] = value
    return out


def optimizer_hparams(optimizers: Iterable[Optimizer]) -> list[list[dict[str, Any]]]:
    """Each group's hyper-parameters (without its parameter list): the same on every rank."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]


def rng_tensors(rank: int) -> dict[str, Tensor]:
    """This rank's random generator states (dropout masks continue as if never stopped)."""
    out = {f"rng.{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"rng.{rank}.cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(
    saved: dict[str, Any], reader: SafeFileSystemReader, path: Path, rank: int, same_world: bool
) -> None:
    """Restore this rank's generators when the checkpoint has them and the world size is unchanged."""
    keys = [k for k in (f"rng.{rank}.cpu", f"rng.{rank}.cuda") if k in saved]
    if not same_world or not keys:
        return  # another layout draws other numbers anyway: keep the seeded generators
    request = {k: torch.empty(saved[k].size, dtype=torch.uint8) for k in keys}
    _dcp_load(request, reader, path)
    torch.set_rng_state(request[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in request and torch.cuda.is_available():
        torch.cuda.set_rng_state(request[f"rng.{rank}.cuda"])


def save_sharded(
    path: str | Path,
    module: nn.Module,
    optimizers: list[Optimizer],
    meta: dict[str, Any],
    rank: int,
) -> Path:
    """Write a checkpoint directory atomically (every rank calls this; ``rank`` is the global rank).

    Inside :func:`async_saves` the shards are written in the background instead and the directory appears
    at the saver's next :meth:`AsyncShardedSaver.commit` (see there).
    """
    saver = _ASYNC_SAVER.get()
    if saver is not None:
        saver.save(path, module, optimizers, meta, rank)
        return Path(path)
    path = Path(path)
    partial = _open_partial(path, rank)
    dcp.save(_save_state(module, optimizers, rank), storage_writer=FileSystemWriter(partial))
    _write_meta(partial, meta, optimizers, rank)
    _commit(path, partial, rank)
    return path


def _open_partial(path: Path, rank: int) -> Path:
    """The hidden directory a save writes into (one name for all ranks), created by rank 0."""
    token = [uuid.uuid4().hex[:8] if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    partial = path.with_name(f".{path.name}.partial-{token[0]}")
    if rank == 0:
        partial.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    return partial


def _save_state(module: nn.Module, optimizers: list[Optimizer], rank: int) -> dict[str, Any]:
    return {**module.state_dict(), **optimizer_tensors(module, optimizers), **rng_tensors(rank)}


def _write_meta(partial: Path, meta: dict[str, Any], optimizers: list[Optimizer], rank: int) -> None:
    if rank == 0:
        torch.save({**meta, "optimizer_hparams": optimizer_hparams(optimizers)}, partial / META_FILE)


def _commit(path: Path, partial: Path, rank: int) -> None:
    """Rename ``partial`` to ``path`` once every rank has written its part (all ranks call this)."""
    dist.barrier()
    if rank == 0:
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)  # a crash right here leaves `.old`, which :func:`resolve` finds
        partial.rename(path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def load_sharded(
    path: str | Path,
    module: nn.Module,
    optimizers: list[Optimizer],
    aliases: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Load model and optimizer state onto this rank's (any) layout; return the rest of ``meta.pt``.

    ``aliases`` maps a parameter name to another whose state it shares (a head tied to the embedding but
    held as a separate copy on the last pipeline stage: a checkpoint from one stage has only the first).
    """
    path = resolve(path)
    reader = SafeFileSystemReader(path)
    meta = read_meta(path)  # before any collective: a bad file fails fast on every rank alike
    saved = reader.read_metadata().state_dict_metadata
    aliases = aliases or {}

    # Model: every tensor of this rank's state dict, resharded by DCP from whatever layout wrote it.
    model_state = module.state_dict()
    missing = [k for k in model_state if k not in saved and aliases.get(k) not in saved]
    if missing:
        raise KeyError(
            f"the checkpoint in {str(path)!r} lacks {len(missing)} model tensors, e.g. {missing[:3]}"
        )
    request = {k if k in saved else aliases[k]: v for k, v in model_state.items()}

    # Optimizer: state tensors per parameter name, created here (a fresh optimizer has none).
    names = {id(p): n for n, p in module.named_parameters()}
    targets: dict[tuple[int, int, str], Tensor] = {}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                prefix = f"{OPTIM_PREFIX}.{i}.state.{name}."
                keys = [k for k in saved if k.startswith(prefix)]
                if not keys and name in aliases:
                    prefix = f"{OPTIM_PREFIX}.{i}.state.{aliases[name]}."
                    keys = [k for k in saved if k.startswith(prefix)]
                for key in keys:
                    field = key[len(prefix) :]
                    shape = saved[key].size
                    target = torch.zeros_like(p) if tuple(shape) == tuple(p.shape) else torch.zeros(shape)
                    request[key] = target
                    targets[(i, id(p), field)] = target
    _dcp_load(request, reader, path)

    with torch.no_grad():
        for name, value in model_state.items():
            src = request[name if name in saved else aliases[name]]
            if src is not value:
                value.copy_(src)
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                fields = {f: t for (j, pid, f), t in targets.items() if j == i and pid == id(p)}
                if fields:
                    opt.state[p] = fields
        hparams = meta.get("optimizer_hparams", [])
        if i < len(hparams):
            if len(hparams[i]) != len(opt.param_groups):
                raise ValueError(
                    f"optimizer {i} has {len(opt.param_groups)} parameter groups but the checkpoint has "
                    f"{len(hparams[i])}: configure_optimizers must build the same groups to resume."
                )
            for group, saved_group in zip(opt.param_groups, hparams[i], strict=True):
                group.update(saved_group)
    meta.pop("optimizer_hparams", None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = (meta.get("parallel_layout") or {}).get("world_size")
    _restore_rng(saved, reader, path, rank, saved_world == world)
    return meta


def _dcp_load(request: dict[str, Any], reader: SafeFileSystemReader, path: Path, **kwargs: Any) -> None:
    """``dcp.load`` whose failures name the checkpoint, and say so when a file held a foreign pickle."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(request, storage_reader=reader, planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as err:
        # DCP reports (exception, traceback) per failed rank.
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()]
        if any(isinstance(f, (pickle.UnpicklingError, UnsafeCheckpointError)) for f in failures):
            raise UnsafeCheckpointError(
                f"a shard file of the checkpoint in {str(path)!r} holds objects a checkpoint never contains; "
                f"refusing to load it (nothing from it was run): {failures[0]!r}"
            ) from None
        raise RuntimeError(
            f"reading the checkpoint in {str(path)!r} failed (a truncated or replaced shard file?): "
            f"{[repr(f) for f in failures] or err}"
        ) from None
