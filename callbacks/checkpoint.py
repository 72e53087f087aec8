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

Preemption (``save_on_sigterm=True``, the default): SIGTERM to any rank (what SLURM, Kubernetes and
torchrun send before killing) makes every rank save ``last.ckpt`` after the same optimizer step
(:mod:`lightning_par.fault_tolerance.preemption`) and end ``fit`` normally, so the process exits with
status 0 and the next launch with ``ckpt_path="last"`` continues from that step. During fit the callback
holds the SIGTERM handler itself (Lightning's would stop each rank at the end of its own current batch,
whichever step the others are in) and gives Lightning's back at the end.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_par.checkpoint.async_save import AsyncShardedSaver
from lightning_par.checkpoint.sharded import async_saves
from lightning_par.fault_tolerance.preemption import PreemptionAgreement


class ShardedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that insists on a strategy writing sharded, atomic, safely loadable checkpoints.

    Args:
        async_save: write the shards in the background, overlapping the next training steps (one save in
            flight at a time: a save first completes the previous one). ``False``: each save returns when
            the checkpoint is on disk.
        save_on_sigterm: on SIGTERM, save ``last.ckpt`` on every rank after the same step and stop.
        **kwargs: Lightning's ``ModelCheckpoint`` arguments (``dirpath``, ``every_n_train_steps``,
            ``save_last``, ``save_top_k``, ``monitor``, ...).
    """

    def __init__(self, async_save: bool = False, save_on_sigterm: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.async_save = async_save
        self.saver = AsyncShardedSaver() if async_save else None
        self.save_on_sigterm = save_on_sigterm
        self._preemption: PreemptionAgreement | None = None
        self._last_step = -1
        self._signalled = False
        self._lightning_handler: Any = None
        self.preempted_at: int | None = None
        """The step after which a SIGTERM stopped the last fit (``None``: it was not preempted)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_par.strategies.hybrid import HybridParallelStrategy

        if not isinstance(trainer.strategy, HybridParallelStrategy):
            raise TypeError(
                f"ShardedCheckpoint needs one of lightning_par's strategies (tp, pp, tp_pp, ...), not "
                f"{type(trainer.strategy).__name__}; use Lightning's ModelCheckpoint with other strategies."
            )
        if self.saver is not None and self.saver.group is None:
            self.saver.group = trainer.strategy.groups.side_channel("async_save")
        if self.save_on_sigterm and stage == "fit":
            world = trainer.world_size > 1
            self._preemption = PreemptionAgreement(
                trainer.strategy.groups.side_channel("sigterm") if world else None
            )
            self._last_step, self.preempted_at = trainer.global_step, None
        super().setup(trainer, pl_module, stage)

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        # After the preemption save the epoch still ends (should_stop): a later save would record the epoch
        # as complete, and a resume would start the next one.
        return self.preempted_at is not None or super()._should_skip_saving_checkpoint(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._preemption is not None and threading.current_thread() is threading.main_thread():
            self._signalled = False
            self._lightning_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def _give_back_handler(self) -> None:
        if self._lightning_handler is not None:
            signal.signal(signal.SIGTERM, self._lightning_handler)
            self._lightning_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._preemption is None or trainer.global_step == self._last_step:
            return  # (not after an optimizer step: mid-accumulation)
        self._last_step = trainer.global_step
        if not self._preemption.step_end(self._signalled):
            return
        # Every rank is here after the same step: save "last" (synchronously) and end fit normally.
        if self.saver is not None:
            self.saver.commit()
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(path)
        self.last_model_path = path
        self._last_checkpoint_saved = True  # (ModelCheckpoint.on_train_end would save "last" once more)
        self.preempted_at = trainer.global_step
        trainer.should_stop = True

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.saver is None:
            super()._save_checkpoint(trainer, filepath)
            return
        # Lightning's own save path (hooks, the strategy's save_checkpoint), with the shards handed to the
        # background writer by save_sharded.
        with async_saves(self.saver):
            super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._give_back_handler()
        if self._preemption is not None:
            self._preemption.close()
        super().on_train_end(trainer, pl_module)
        if self.saver is not None:
            self.saver.commit()  # the last save is complete on disk when fit returns

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._give_back_handler()
        saver, self.saver = self.saver, None
        if saver is not None:
            # Peers may be gone: do not wait for (or rename) the pending save; it stays a partial directory.
            saver.abandon()
        super().on_exception(trainer, pl_module, exception)  # save_on_exception, if asked, is synchronous
        if saver is not None:
            self.saver = AsyncShardedSaver()  # a later fit saves asynchronously again
