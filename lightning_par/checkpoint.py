"""Sharded checkpoints: each rank writes its own shards, saves are atomic, loads reshard and run no code.

Where this sits: :class:`lightning_par.HybridParallelStrategy` calls :func:`save_sharded` from Lightning's
``save_checkpoint`` (ModelCheckpoint, ``trainer.save_checkpoint``) and :func:`load_sharded` from
``load_checkpoint`` (``trainer.fit(..., ckpt_path=...)``).

A checkpoint is a directory:

* ``.metadata`` and ``__<rank>_0.distcp``: ``torch.distributed.checkpoint`` (DCP) files with every tensor
  under its global name: the model's state dict (``model.layers.7.attn.qkv.weight``, whole or as DTensor
  shards) and the optimizer state per parameter (``optim.0.state.<parameter name>.exp_avg``). DCP reshards
  on load, so any tp / pp / dp layout reads any other's checkpoint.
* ``meta.pt``: what Lightning keeps beside the tensors (loops, callbacks, LR schedulers, hyper-parameters,
  the optimizer's hyper-parameters per group, the layout that wrote it), written by rank 0.

Why not Lightning's and DCP's own loading: DCP's ``FileSystemReader`` reads ``.metadata`` with plain
``pickle.load`` and its default planner reads non-tensor items with ``torch.load(weights_only=False)``, so a
crafted checkpoint runs code inside ``dcp.load`` (DESIGN §7). Here ``.metadata`` goes through an unpickler
that admits only DCP's metadata classes, non-tensor items and ``meta.pt`` through ``weights_only=True``.
And DCP's optimizer state dict keeps each group's parameter list, which differs between pipeline stages
that write under the same key; here optimizer state is stored per parameter name instead.

Atomicity: a save is written to a hidden ``.<name>.partial-<id>`` directory and renamed into place once
every rank has finished, so a crash during the (long) write leaves the previous checkpoint as it was.
:class:`AsyncShardedSaver` keeps that rule while the write overlaps training: the rename waits until the
background write is done on every rank (at the next save or at the end of training).
"""

from __future__ import annotations

import io
import pickle
import shutil
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.optim import Optimizer

META_FILE = "meta.pt"
OPTIM_PREFIX = "optim"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than the data this package writes; nothing was run."""


# ---- reading without running code -------------------------------------------------------------------
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, ``torch.Size`` and dtypes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"the checkpoint's .metadata refers to {module}.{name}, which DCP metadata never contains; "
            f"refusing to load it (nothing from it was run)."
        )


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpointError:
                raise
            except Exception as err:
                raise UnsafeCheckpointError(f"{path} is not DCP metadata: {err}") from err
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata.")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"item {read_item.dest_index.fqn!r}: {err}") from err
        self.state_dict[read_item.dest_index.fqn] = obj
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.pt`` through torch's restricted unpickler (tensors, containers, numbers, strings only)."""
    try:
        return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path / META_FILE} holds objects a checkpoint of this package never contains; refusing to "
            f"load it (nothing from it was run): {err}"
        ) from err


def resolve(path: str | Path) -> Path:
    """The checkpoint directory; after a crash between the two renames of a save, the previous one."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.is_dir():
            return old
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist.")
    if not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a sharded checkpoint of lightning-par (a directory with .metadata "
            f"and {META_FILE})."
        )
    return path


# ---- what goes into a checkpoint ----------------------------------------------------------------------
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


class AsyncShardedSaver:
    """Sharded saves whose shard writing overlaps training; at most one in flight.

    A save copies this rank's tensors to CPU memory (the only part training waits for), writes ``meta.pt``
    (rank 0) and hands the shards to ``torch.distributed.checkpoint.async_save``, which writes them from a
    background thread into the hidden ``.<name>.partial-<id>`` directory. The rename to ``<name>`` (what
    makes it the checkpoint, "last" included) happens in :meth:`commit`, when this rank's write has
    finished and a barrier says every other rank's has: at the next save, or when training ends. Until then
    the previous checkpoint under that name is untouched; a crash leaves only a partial directory.

    DCP coordinates the ranks of a save with collectives (plans, metadata). Run from the background thread
    on the training's process group, they would interleave with training's own collectives (gloo and NCCL
    both require one order per group), so the saver uses a gloo group of its own, made at its first save.
    """

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._pending: tuple[Path, Path, int, Future[Any]] | None = None

    @property
    def in_flight(self) -> bool:
        """A save has started and its shards are still being written on this rank."""
        return self._pending is not None and not self._pending[3].done()

    @property
    def pending_path(self) -> Path | None:
        """The hidden directory of the save not yet committed (written or not), if any."""
        return None if self._pending is None else self._pending[1]

    def save(
        self,
        path: str | Path,
        module: nn.Module,
        optimizers: list[Optimizer],
        meta: dict[str, Any],
        rank: int,
    ) -> None:
        """Commit the previous save, then start this one; returns once the tensors are copied."""
        self.commit()
        if self._group is None:
            self._group = dist.new_group(backend="gloo")  # every rank saves together: a collective call
        path = Path(path)
        partial = _open_partial(path, rank)
        future = dcp.async_save(
            _save_state(module, optimizers, rank),
            storage_writer=FileSystemWriter(partial),
            process_group=self._group,
        )
        _write_meta(partial, meta, optimizers, rank)
        self._pending = (path, partial, rank, future)

    def commit(self) -> Path | None:
        """Wait for the pending save's shards (every rank calls this), then rename it into place."""
        if self._pending is None:
            return None
        path, partial, rank, future = self._pending
        self._pending = None
        future.result()  # re-raises a failed write here, on the training thread
        _commit(path, partial, rank)
        return path

    def abandon(self) -> None:
        """Forget the pending save without renaming it (after a failure: it stays a partial directory)."""
        self._pending = None


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


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory from a sharded GPT or BERT checkpoint, in one process.

    GPT gives ``GPT2LMHeadModel``; BERT gives ``BertForMaskedLM`` or ``BertForSequenceClassification``
    (told apart by the saved tensor names). No process group and no training layout are needed: DCP reads
    every shard into whole tensors. The model shape comes from the hyper-parameters in ``meta.pt``; the
    padded vocabulary from the saved tensors.
    """
    import inspect

    from lightning_par.models.gpt import GPT, GPTNetwork
    from lightning_par.models.hf import export_gpt2

    path = resolve(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir={str(out)!r} exists and is not empty; choose a new directory.")
    meta = read_meta(path)
    hparams = dict(meta.get("hyper_parameters") or {})
    if not hparams or "n_layer" not in hparams:
        raise ValueError(
            f"the checkpoint in {str(path)!r} has no GPT hyper-parameters to rebuild the model from."
        )
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    if "model.embed.tte.weight" in saved:  # token-type embeddings: a BERT checkpoint
        from lightning_par.models.hf_bert import export_bert_checkpoint

        return export_bert_checkpoint(hparams, saved, lambda s: _dcp_load(s, reader, path, no_dist=True), out)
    accepted = set(inspect.signature(GPT.__init__).parameters) - {"self", "hf_checkpoint"}
    model = GPT(**{k: v for k, v in hparams.items() if k in accepted})
    if model.config.num_experts:
        raise ValueError(
            f"the checkpoint in {str(path)!r} is a mixture-of-experts GPT (num_experts="
            f"{model.config.num_experts}); GPT-2 in transformers has no expert layers, so it cannot be exported "
            f"as GPT2LMHeadModel. Export a dense GPT (num_experts=0)."
        )
    wte = saved.get("model.embed.wte.weight")
    if wte is None:
        raise KeyError(
            f"the checkpoint in {str(path)!r} has no model.embed.wte.weight: not a GPT checkpoint."
        )
    model.model = GPTNetwork(model.config, int(wte.size[0]))
    state = model.state_dict()
    _dcp_load(state, reader, path, no_dist=True)
    return export_gpt2(model, out)


# ---- the data position within an epoch ------------------------------------------------------------------
class _SkipFirst:
    """A batch sampler that leaves out the first ``skip`` batches of the wrapped one (once)."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class ResumableLoader:
    """A map-style ``DataLoader`` whose position within the epoch goes into checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one and calls ``load_state_dict`` on
    resume; the next epoch iteration then starts after the batches already trained on (skipped in the
    batch sampler: no data is loaded for them), so a resumed run sees the batches the uninterrupted run
    would have. ``position`` returns the number of batches trained in the current epoch (the strategy reads
    Lightning's progress counter, which, unlike the loader, is not ahead by the prefetched batch).
    """

    def __init__(self, loader: Any, position: Any) -> None:
        self.loader = loader
        self.position = position
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        if not skip:
            return iter(self.loader)
        from torch.utils.data import DataLoader

        loader = self.loader
        return iter(
            DataLoader(
                loader.dataset,
                batch_sampler=_SkipFirst(loader.batch_sampler, skip),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn,
                persistent_workers=False,
            )
        )

    def state_dict(self) -> dict[str, int]:
        return {"batches_done_in_epoch": int(self.position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_done_in_epoch", 0))
        if self._skip >= len(self.loader):
            self._skip = 0  # saved on the epoch's last batch: the next epoch starts from its beginning

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, dataset, ... as the wrapped loader
        return getattr(self.__dict__["loader"], name)
