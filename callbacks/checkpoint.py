"""``ShardedCheckpoint``: Lightning's ModelCheckpoint for the parallel strategies' sharded checkpoints.

Scheduling (``every_n_train_steps``, ``save_last``, ``save_top_k`` by ``monitor``) is Lightning's. What a
save writes and how a resume reads it is the strategy's (:mod:`lightning_par.checkpoint`): every rank
writes its own shards, the directory appears atomically when all are done, and ``ckpt_path="last"``
reloads on any layout without running anything stored in the files.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ShardedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that insists on a strategy writing sharded, atomic, safely loadable checkpoints."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_par.strategy import HybridParallelStrategy

        if not isinstance(trainer.strategy, HybridParallelStrategy):
            raise TypeError(
                f"ShardedCheckpoint needs one of lightning_par's strategies (tp, pp, tp_pp, ...), not "
                f"{type(trainer.strategy).__name__}; use Lightning's ModelCheckpoint with other strategies."
            )
        super().setup(trainer, pl_module, stage)
