"""Global batch size: gradient accumulation (or pipeline microbatches) derived from one number.

``GlobalBatchSize(global_batch_size=64, micro_batch_size=4)`` on dp=2 means 8 micro-batches of 4 per
replica and optimizer step: ``accumulate_grad_batches=8`` without pipeline parallel, or 8 pipeline
microbatches (a loader batch of 32 per replica) with it. The data module's ``batch_size`` is set to match.

The loss of a step is normalised by the tokens of the whole global batch (the strategy divides the summed
gradients by the global token count), so accumulation gives the gradients of one batch k times larger even
when micro-batches hold different numbers of counted (non -100) tokens; a mean of per-micro-batch means
would weight a token in a short micro-batch more.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_par.pipeline import check_schedule


class GlobalBatchSize(L.Callback):
    """Set accumulation / microbatches from ``global = micro x steps x dp``; log consumed samples and tokens.

    Args:
        global_batch_size: samples per optimizer step, over all data-parallel replicas.
        micro_batch_size: samples per forward/backward (per pipeline microbatch under pipeline parallel).
    """

    def __init__(self, global_batch_size: int, micro_batch_size: int) -> None:
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.steps_per_update = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self._tokens_this_step: torch.Tensor | int = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        layout = getattr(strategy, "layout", None)
        dp = layout.dp if layout is not None else trainer.world_size
        pp = layout.pp if layout is not None else 1
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            valid = [per_step * k for k in range(1, 5)]
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x data_parallel_size ({dp}) = {per_step}; valid global batch sizes "
                f"include {valid}."
            )
        steps = self.global_batch_size // per_step
        self.steps_per_update = steps
        if pp > 1:
            explicit = getattr(strategy, "_microbatches_arg", None)
            if explicit is not None and explicit != steps:
                raise ValueError(
                    f"num_microbatches={explicit} on the strategy disagrees with GlobalBatchSize(global_batch_size="
                    f"{self.global_batch_size}, micro_batch_size={self.micro_batch_size}) on dp={dp}, which needs "
                    f"{steps}; leave num_microbatches unset and let GlobalBatchSize choose it."
                )
            check_schedule(strategy.pipeline_schedule, pp, steps, strategy.virtual_pipeline_size)
            strategy._microbatches_arg = steps
            trainer.accumulate_grad_batches = 1
            loader_batch = self.micro_batch_size * steps
        else:
            trainer.accumulate_grad_batches = steps
            loader_batch = self.micro_batch_size
        data = trainer.datamodule
        if data is not None and hasattr(data, "batch_size"):
            data.batch_size = loader_batch
        self._loader_batch = loader_batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        if ids.shape[0] > self._loader_batch:
            raise ValueError(
                f"a training batch has {ids.shape[0]} samples per replica, but GlobalBatchSize(global_batch_size="
                f"{self.global_batch_size}, micro_batch_size={self.micro_batch_size}) needs {self._loader_batch}: "
                f"set the data loader's batch_size to {self._loader_batch}."
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = outputs.get("num_tokens") if isinstance(outputs, dict) else None
        if tokens is not None:  # kept on the device: no host sync per micro-batch
            self._tokens_this_step = self._tokens_this_step + tokens.float()
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        # A step was taken: count it over every replica (one small all-reduce per optimizer step).
        t = torch.as_tensor(self._tokens_this_step, dtype=torch.float32, device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="sum")
        self.consumed_tokens += int(t.item())
        self.consumed_samples += self.global_batch_size
        self._tokens_this_step = 0
        pl_module.log("train/global_batch_size", float(self.global_batch_size), on_step=True, on_epoch=False)
        pl_module.log("train/consumed_samples", float(self.consumed_samples), on_step=True, on_epoch=False)
        pl_module.log("train/consumed_tokens", float(self.consumed_tokens), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.consumed_samples = state_dict.get("consumed_samples", 0)
        self.consumed_tokens = state_dict.get("consumed_tokens", 0)
