"""Tokens per second in the progress bar and the logger."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_sec``: tokens of the global batch (over data-parallel replicas) per second.

    Measured between the ends of consecutive training batches, so the data loader, forward, backward,
    communication and optimizer step are all included.
    """

    def __init__(self, log_every_n_steps: int = 1) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._last: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        last, self._last = self._last, now
        if last is None or trainer.global_step % self.log_every_n_steps:
            return
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        dp = (
            trainer.strategy.distributed_sampler_kwargs.get("num_replicas", 1)
            if trainer.world_size > 1
            else 1
        )
        tokens = ids.numel() * dp
        rate = torch.tensor(tokens / max(now - last, 1e-9))
        pl_module.log("train/tokens_per_sec", rate, prog_bar=True, on_step=True, on_epoch=False)
