"""``MemoryReport``: what every rank holds in one training step, in bytes, logged and printed as a table.

The figures and their exact definitions are :mod:`lightning_par.memory.report`'s. Saved activations are
counted with saved-tensor hooks over the whole step (forward and backward, every micro-batch; under
pipeline parallel every stage call), including what blocks under activation recomputation hold: their
inputs, the outputs the selective policy keeps and, during backward, what their recompute refills. Each
rank's report is gathered to every rank (``reports``), logged as ``memory/<key>`` (the largest over
ranks) and ``memory/rank<r>/<key>``, and rank 0 prints the table.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from lightning_par.memory.report import (
    KEYS,
    cuda_peak,
    format_table,
    gradient_bytes,
    static_report,
)
from lightning_par.memory.saved import SavedTensorCounter, start, stop


class MemoryReport(L.Callback):
    """Measure one optimizer step's memory on every rank.

    Args:
        step: the optimizer step to measure (0-based, as ``trainer.global_step`` counts; ``None``: the
            second, when the first has created the optimizer state; the first when training has one).
    """

    def __init__(self, step: int | None = None) -> None:
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ValueError(f"step={step!r} is not valid: it must be None or an integer >= 0.")
        self.step = step
        self.report: dict[str, int | None] | None = None
        """This rank's figures (keys: :data:`~lightning_par.memory.report.KEYS`), once measured."""
        self.reports: list[dict[str, int | None]] | None = None
        """Every rank's figures, by global rank."""
        self.table: str | None = None
        self._counter: SavedTensorCounter | None = None
        self._counting: Any = None
        self._grads = 0

    def _target(self, trainer: L.Trainer) -> int:
        if self.step is not None:
            return self.step
        return 0 if trainer.max_steps in (0, 1) else 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (
            self._counting is not None
            or self.report is not None
            or trainer.global_step != self._target(trainer)
        ):
            return
        self._grads = 0
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._counter = SavedTensorCounter([*pl_module.parameters(), *pl_module.buffers()])
        self._counting = start(self._counter)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counting is not None:  # (the gradients before the strategy reduces them)
            self._grads = max(self._grads, gradient_bytes(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._counting is None or trainer.global_step <= self._target(trainer):
            return  # (accumulating: the step goes on)
        counter = self._finish()
        report = static_report(pl_module, trainer.optimizers, self._grads)
        report["activations_peak"] = counter.peak
        report["cuda_max_allocated"] = cuda_peak(trainer.strategy.root_device)
        self.report = report
        if dist.is_available() and dist.is_initialized():
            reports: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(reports, report)
        else:
            reports = [report]
        self.reports = reports
        self.table = format_table(reports)
        metrics: dict[str, float] = {}
        for key in KEYS:
            values = [r[key] for r in reports if r[key] is not None]
            if values:
                metrics[f"memory/{key}"] = float(max(values))
            for rank, r in enumerate(reports):
                if r[key] is not None:
                    metrics[f"memory/rank{rank}/{key}"] = float(r[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"Memory per rank at step {self._target(trainer)}:\n{self.table}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._counting is not None:
            self._finish()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counting is not None:  # (training ended inside the measured step)
            self._finish()

    def _finish(self) -> SavedTensorCounter:
        stop(self._counting)
        counter, self._counter, self._counting = self._counter, None, None
        assert counter is not None
        return counter
