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
crafted checkpoint runs code inside ``dcp.load``. Here ``.metadata`` goes through an unpickler
that admits only DCP's metadata classes, non-tensor items and ``meta.pt`` through ``weights_only=True``.
And DCP's optimizer state dict keeps each group's parameter list, which differs between pipeline stages
that write under the same key; here optimizer state is stored per parameter name instead.

Atomicity: a save is written to a hidden ``.<name>.partial-<id>`` directory and renamed into place once
every rank has finished, so a crash during the (long) write leaves the previous checkpoint as it was.
:class:`AsyncShardedSaver` keeps that rule while the write overlaps training: the rename waits until the
background write is done on every rank (at the next save or at the end of training).
"""

from lightning_par.checkpoint.async_save import AsyncShardedSaver
from lightning_par.checkpoint.hf import HFExporter, export_hf, register_hf_exporter
from lightning_par.checkpoint.safe import (
    META_FILE,
    OPTIM_PREFIX,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    read_meta,
    resolve,
)
from lightning_par.checkpoint.sharded import (
    async_saves,
    load_sharded,
    optimizer_hparams,
    optimizer_tensors,
    rng_tensors,
    save_sharded,
)

__all__ = [
    "AsyncShardedSaver",
    "HFExporter",
    "META_FILE",
    "OPTIM_PREFIX",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnsafeCheckpointError",
    "async_saves",
    "export_hf",
    "load_sharded",
    "optimizer_hparams",
    "optimizer_tensors",
    "read_meta",
    "register_hf_exporter",
    "resolve",
    "rng_tensors",
    "save_sharded",
]
