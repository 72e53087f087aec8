"""Asynchronous sharded saves: DCP's ``async_save`` in the background, renamed into place when done."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.optim import Optimizer

from lightning_par.checkpoint.sharded import _commit, _open_partial, _save_state, _write_meta


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
    both require one order per group), so the saver uses a gloo group of its own: ``group``, given by
    ``ShardedCheckpoint`` from the strategy's groups (``ParallelGroups.side_channel``), or made at the first
    save when none was given.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
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
        if self.group is None:
            self.group = dist.new_group(backend="gloo")  # every rank saves together: a collective call
        path = Path(path)
        partial = _open_partial(path, rank)
        future = dcp.async_save(
            _save_state(module, optimizers, rank),
            storage_writer=FileSystemWriter(partial),
            process_group=self.group,
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
