"""Global batch size: gradient accumulation (or pipeline microbatches) derived from one number, with ramp-up.

``GlobalBatchSize(global_batch_size=64, micro_batch_size=4)`` on dp=2 means 8 micro-batches of 4 per
replica and optimizer step: ``accumulate_grad_batches=8`` without pipeline parallel, or 8 pipeline
microbatches (a loader batch of 32 per replica) with it. The data module's ``batch_size`` is set to match.

The loss of a step is normalised by the tokens of the whole global batch (the strategy divides the summed
gradients by the global token count), so accumulation gives the gradients of one batch k times larger even
when micro-batches hold different numbers of counted (non -100) tokens; a mean of per-micro-batch means
would weight a token in a short micro-batch more.

Ramp-up (Megatron's ``--rampup-batch-size <start> <increment> <samples>``): the global batch starts at
``start`` and grows by ``increment`` each time ``samples / ((global - start) / increment)`` more samples have
been consumed, until it is ``global_batch_size``. Without pipeline parallel the number of accumulated
micro-batches then changes from one optimizer step to the next. Lightning decides "step now" and "zero the
gradients now" with ``batch_idx % accumulate_grad_batches``, which is only right for a constant k, so under a
ramp this callback makes both decisions itself (from the micro-batches counted in the current step) and sets
``trainer.accumulate_grad_batches`` to the step's k at its first micro-batch: Lightning's closure divides the
loss by that k and the strategy's ``backward`` multiplies it back into a token sum, the same k within a step,
so the per-step division by the global token count stays exact. The ramp is driven by ``consumed_samples``,
which checkpoints keep.

Under pipeline parallel with a ramp, every pipeline run has ``m = gcd(start, increment) / (micro x dp)``
microbatches (the loader's batch is ``micro x m``), and a step of global batch ``B`` accumulates
``B / (micro x m x dp)`` pipeline runs; the strategy then keeps token-summed gradients over the runs and
divides them by the step's global token count, as without pipeline parallel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from lightning_par.pipeline.schedules import check_schedule
from lightning_par.strategies.lightning_patches import AccumulationOverride


@dataclass(frozen=True)
class BatchSizeRampup:
    """Megatron's ``--rampup-batch-size <start> <increment> <samples>`` (YAML: ``{start: 8, increment: 8, samples: 1000}``).

    Args:
        start: the global batch size of the first optimizer step.
        increment: how much the global batch size grows at each stage of the ramp.
        samples: samples consumed over the whole ramp; after them the global batch is ``global_batch_size``.
    """

    start: int
    increment: int
    samples: int


class GlobalBatchSize(L.Callback):
    """Set accumulation / microbatches from ``global = micro x steps x dp``; log consumed samples and tokens.

    Args:
        global_batch_size: samples per optimizer step, over all data-parallel replicas (after any ramp-up).
        micro_batch_size: samples per forward/backward (per pipeline microbatch under pipeline parallel).
        rampup: a linear ramp-up of the global batch size (Megatron's ``--rampup-batch-size``), as a
            :class:`BatchSizeRampup` or ``[start, increment, samples]``. ``None``: constant global batch.
            Under pipeline parallel, ``gcd(start, increment) / (micro x dp)`` is the number of microbatches
            of each pipeline run, and must suit the schedule (e.g. at least pp for 1F1B).
    """

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        rampup: BatchSizeRampup | list[int] | None = None,
    ) -> None:
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
            if not _is_positive_int(value):
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
        if global_batch_size % micro_batch_size:
            # Known before any process starts; the multiple of micro x dp is checked at setup.
            valid = [micro_batch_size * k for k in range(1, 5)]
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
                f"{micro_batch_size}: a step is a whole number of micro-batches; valid global batch sizes "
                f"include {valid}."
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rampup = _check_rampup(rampup, global_batch_size)
        self.steps_per_update = 0  # micro-batches (or pipeline microbatches) of the current optimizer step
        self.current_global_batch_size = self.global_batch_size_at(0)
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self._tokens_this_step: torch.Tensor | int = 0
        self._samples_this_step = 0
        self._micro_in_step = 0  # micro-batches of the current step seen so far (ramp-up only)
        self._step_open = False  # a step has begun and not yet been taken (ramp-up only)
        self._dp = 1
        self._rows_per_batch = 1  # samples per loader batch over all replicas (micro x dp, x m under pp)
        self._loop_override: AccumulationOverride | None = None

    # ---- the schedule ---------------------------------------------------------------------------------
    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The global batch size of the step that starts after ``consumed_samples`` (Megatron's formula)."""
        ramp = self.rampup
        if ramp is None or consumed_samples > ramp.samples:
            return self.global_batch_size
        num_increments = (self.global_batch_size - ramp.start) // ramp.increment
        samples_per_increment = ramp.samples / num_increments
        return ramp.start + int(consumed_samples / samples_per_increment) * ramp.increment

    # ---- setup --------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        layout = getattr(strategy, "layout", None)
        dp = layout.dp if layout is not None else trainer.world_size
        pp = layout.pp if layout is not None else 1
        self._dp = dp
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            valid = [per_step * k for k in range(1, 5)]
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x data_parallel_size ({dp}) = {per_step}; valid global batch sizes "
                f"include {valid}."
            )
        if self.rampup is not None:
            self._check_rampup_layout(per_step, dp, pp)
        steps = self.global_batch_size // per_step
        self.steps_per_update = steps
        if pp > 1:
            # Microbatches per pipeline run: the whole step, or (ramp) the largest run every step size divides.
            unit = self.global_batch_size
            if self.rampup is not None:
                unit = math.gcd(self.rampup.start, self.rampup.increment, self.global_batch_size)
            m = unit // per_step
            explicit = strategy.requested_num_microbatches
            if explicit is not None and explicit != m:
                raise ValueError(
                    f"num_microbatches={explicit} on the strategy disagrees with GlobalBatchSize(global_batch_size="
                    f"{self.global_batch_size}, micro_batch_size={self.micro_batch_size}, rampup={self.rampup}) "
                    f"on dp={dp}, which needs {m}; leave num_microbatches unset and let GlobalBatchSize choose it."
                )
            try:
                check_schedule(strategy.pipeline_schedule, pp, m, strategy.virtual_pipeline_size)
            except ValueError as err:
                if self.rampup is None:
                    raise
                raise ValueError(
                    f"rampup={self.rampup} gives pipeline runs of gcd(start, increment) / (micro_batch_size x "
                    f"dp) = {m} microbatches, which the schedule refuses: {err} Choose start and increment "
                    f"whose gcd is a larger multiple of {per_step}."
                ) from err
            strategy.set_num_microbatches(m)
            self._rows_per_batch = per_step * m
            self.steps_per_update = self.global_batch_size // self._rows_per_batch
            # 1 at setup (the strategy refuses a user's accumulation under pp); a ramp sets each step's.
            trainer.accumulate_grad_batches = 1
            loader_batch = self.micro_batch_size * m
        else:
            self._rows_per_batch = per_step
            trainer.accumulate_grad_batches = steps
            loader_batch = self.micro_batch_size
        data = trainer.datamodule
        if data is not None and hasattr(data, "batch_size"):
            data.batch_size = loader_batch
        self._loader_batch = loader_batch

    def _check_rampup_layout(self, per_step: int, dp: int, pp: int) -> None:
        """The ramp's sizes must split into whole micro-batches on every replica."""
        ramp = self.rampup
        assert ramp is not None
        for name, value in (("start", ramp.start), ("increment", ramp.increment)):
            if value % per_step:
                valid = [per_step * k for k in range(1, 5) if per_step * k < self.global_batch_size]
                raise ValueError(
                    f"rampup.{name}={value} is not a multiple of micro_batch_size ({self.micro_batch_size}) x "
                    f"data_parallel_size ({dp}) = {per_step}; valid values include {valid}."
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rampup is not None:
            self._take_over_accumulation(trainer)

    def _take_over_accumulation(self, trainer: L.Trainer) -> None:
        """Decide "optimizer step now" and "zero the gradients now" from the micro-batches of this step.

        Lightning's own decisions use ``batch_idx % accumulate_grad_batches`` and break when k changes
        mid-epoch; :class:`~lightning_par.strategies.lightning_patches.AccumulationOverride` replaces them on
        this trainer's loop objects only, until the end of fit.
        """
        self._loop_override = AccumulationOverride(
            # Between steps (also on restart from a checkpoint, always taken at a step's end): reached.
            step_complete=lambda: not self._step_open or self._micro_in_step >= self.steps_per_update,
            first_micro_batch=lambda: self._micro_in_step == 1,
        )
        self._loop_override.install(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release_loop()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release_loop()

    def _release_loop(self) -> None:
        if self._loop_override is not None:
            self._loop_override.uninstall()
            self._loop_override = None

    # ---- each batch ---------------------------------------------------------------------------------
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
        if self.rampup is not None:
            if not self._step_open:  # the first micro-batch of an optimizer step: its size from the ramp
                self._step_open, self._micro_in_step = True, 0
                self.current_global_batch_size = self.global_batch_size_at(self.consumed_samples)
                self.steps_per_update = self.current_global_batch_size // self._rows_per_batch
                # Lightning's closure divides each micro-batch's loss by this, the strategy's backward
                # multiplies it back: it must hold for every micro-batch of the step.
                trainer.accumulate_grad_batches = self.steps_per_update
            self._micro_in_step += 1
        self._samples_this_step += int(ids.shape[0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = outputs.get("num_tokens") if isinstance(outputs, dict) else None
        if tokens is not None:  # kept on the device: no host sync per micro-batch
            self._tokens_this_step = self._tokens_this_step + tokens.float()
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        # A step was taken (also a short one at the end of an epoch): count what it consumed over every
        # replica, tokens and samples in one small all-reduce per optimizer step.
        counts = torch.stack(
            [
                torch.as_tensor(self._tokens_this_step, dtype=torch.float64, device=pl_module.device),
                torch.tensor(float(self._samples_this_step), dtype=torch.float64, device=pl_module.device),
            ]
        )
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.consumed_tokens += int(counts[0].item())
        self.consumed_samples += int(counts[1].item())
        step_batch = self.current_global_batch_size
        self._tokens_this_step, self._samples_this_step, self._step_open = 0, 0, False
        pl_module.log("train/global_batch_size", float(step_batch), on_step=True, on_epoch=False)
        pl_module.log("train/consumed_samples", float(self.consumed_samples), on_step=True, on_epoch=False)
        pl_module.log("train/consumed_tokens", float(self.consumed_tokens), on_step=True, on_epoch=False)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        # The ramp's position is a function of consumed_samples: restoring it restores the ramp.
        self.consumed_samples = state_dict.get("consumed_samples", 0)
        self.consumed_tokens = state_dict.get("consumed_tokens", 0)
        self.current_global_batch_size = self.global_batch_size_at(self.consumed_samples)
        self._step_open = False


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_rampup(
    rampup: BatchSizeRampup | Sequence[int] | None, global_batch_size: int
) -> BatchSizeRampup | None:
    """The ramp as a :class:`BatchSizeRampup`, refused early (before any process starts) when malformed."""
    if rampup is None:
        return None
    if not isinstance(rampup, BatchSizeRampup):
        if isinstance(rampup, (str, bytes)) or not isinstance(rampup, Sequence) or len(rampup) != 3:
            raise ValueError(
                f"rampup={rampup!r} is not valid: give [start, increment, samples] (Megatron's "
                f"--rampup-batch-size), a BatchSizeRampup, or None."
            )
        rampup = BatchSizeRampup(*rampup)
    for name in ("start", "increment", "samples"):
        value = getattr(rampup, name)
        if not _is_positive_int(value):
            raise ValueError(f"rampup.{name}={value!r} is not valid: it must be an integer >= 1.")
    if rampup.start >= global_batch_size:
        raise ValueError(
            f"rampup.start={rampup.start} is not valid with global_batch_size={global_batch_size}: the ramp must "
            f"start below the global batch size (1 to {global_batch_size - 1}); use rampup=None for a constant one."
        )
    diff = global_batch_size - rampup.start
    if diff % rampup.increment:
        valid = [d for d in range(1, diff + 1) if diff % d == 0]
        raise ValueError(
            f"rampup.increment={rampup.increment} does not divide global_batch_size - rampup.start = "
            f"{global_batch_size} - {rampup.start} = {diff}; valid increments: {valid}."
        )
    return rampup
