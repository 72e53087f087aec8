"""Throughput: tokens per second in the progress bar; samples, tokens, FLOP/s and MFU in the loggers."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor


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


class ParallelThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for tp / pp / dp layouts: samples, tokens, FLOP/s and MFU.

    What changes from the parent: the throughput of one *model replica* (its tp x pp devices) is what one
    "device" of the parent measures, so global figures multiply by the number of data-parallel replicas
    (not by the world size, which would count tp and pp peers as extra data), and MFU divides the
    replica's FLOP/s by the peak of its tp x pp devices. The model's FLOPs come from its config
    (``pl_module.flops_per_token(seq_len)``: 6 x matmul parameters + attention, forward and backward);
    peak FLOP/s are Lightning's table of common GPUs. On CPU there is no peak, so MFU is not reported and
    achieved FLOP/s are.

    Logged (to the loggers, every optimizer step once the window is full): ``train/samples_per_sec``,
    ``train/items_per_sec`` (tokens), ``train/flops_per_sec``, ``train/device/...`` (one replica) and,
    on GPUs, ``train/device/mfu``.
    """

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(
            batch_size_fn=lambda batch: _ids(batch).shape[0],
            length_fn=lambda batch: _ids(batch).numel(),
            window_size=window_size,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        layout = getattr(trainer.strategy, "layout", None)
        replicas = layout.dp if layout is not None else trainer.world_size
        per_replica = layout.tp * layout.pp if layout is not None else 1
        available = self.available_flops * per_replica if self.available_flops else None
        for key in list(self._throughputs):
            self._throughputs[key] = Throughput(available_flops=available, world_size=replicas, **self.kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        flops_per_token = getattr(pl_module, "flops_per_token", None)
        if flops_per_token is not None:
            ids = _ids(batch)
            pl_module.flops_per_batch = flops_per_token(ids.shape[1]) * ids.numel()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)


def _ids(batch: Any) -> torch.Tensor:
    return batch["input_ids"] if isinstance(batch, dict) else batch[0]
