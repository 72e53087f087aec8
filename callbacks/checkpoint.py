"""``ShardedCheckpoint``: Lightning's ModelCheckpoint for the parallel strategies' sharded checkpoints.

Scheduling (``every_n_train_steps``, ``save_last``, ``save_top_k`` by ``monitor``) is Lightning's. What a
save writes and how a resume reads it is the strategy's (:mod:`lightning_par.checkpoint`): every rank
writes its own shards, the directory appears atomically when all are done, and ``ckpt_path="last"``
reloads on any layout without running anything stored in the files.

With ``async_save=True`` the shards are written by a background thread while training goes on
(:class:`lightning_par.checkpoint.AsyncShardedSaver`): a save blocks only while the tensors are copied to
CPU memory. The checkpoint's directory (``last.ckpt`` included) appears when the write has finished on
every rank, at this callback's next save or at the end of training; until then the previous one is
untouched, and a run that fails in between leaves only a hidden partial directory.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_par.checkpoint.async_save import AsyncShardedSaver
from lightning_par.checkpoint.sharded import async_saves


class ShardedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that insists on a strategy writing sharded, atomic, safely loadable checkpoints.

    Args:
        async_save: write the shards in the background, overlapping the next training steps (one save in
            flight at a time: a save first completes the previous one). ``False``: each save returns when
            the checkpoint is on disk.
        **kwargs: Lightning's ``ModelCheckpoint`` arguments (``dirpath``, ``every_n_train_steps``,
            ``save_last``, ``save_top_k``, ``monitor``, ...).
    """

    def __init__(self, async_save: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.async_save = async_save
        self.saver = AsyncShardedSaver() if async_save else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_par.strategies.hybrid import HybridParallelStrategy

        if not isinstance(trainer.strategy, HybridParallelStrategy):
            raise TypeError(
                f"ShardedCheckpoint needs one of lightning_par's strategies (tp, pp, tp_pp, ...), not "
                f"{type(trainer.strategy).__name__}; use Lightning's ModelCheckpoint with other strategies."
            )
        if self.saver is not None and self.saver.group is None:
            self.saver.group = trainer.strategy.groups.side_channel("async_save")
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.saver is None:
            super()._save_checkpoint(trainer, filepath)
            return
        # Lightning's own save path (hooks, the strategy's save_checkpoint), with the shards handed to the
        # background writer by save_sharded.
        with async_saves(self.saver):
            super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.saver is not None:
            self.saver.commit()  # the last save is complete on disk when fit returns

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        saver, self.saver = self.saver, None
        if saver is not None:
            # Peers may be gone: do not wait for (or rename) the pending save; it stays a partial directory.
            saver.abandon()
        super().on_exception(trainer, pl_module, exception)  # save_on_exception, if asked, is synchronous
        if saver is not None:
            self.saver = AsyncShardedSaver()  # a later fit saves asynchronously again
