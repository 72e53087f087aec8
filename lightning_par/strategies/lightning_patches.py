"""The Lightning internals this package replaces, in one place (written against Lightning 2.6).

Where Lightning has no public hook for what a layout needs, the workaround lives here, says what it
replaces, and ``tests/test_architecture.py`` fails if that internal disappears:

* :class:`DeferredSigtermCheck` takes the place of ``_TrainingEpochLoop._broadcast_sigterm_tensor``
  (a per-step world barrier) under pipeline parallel;
* :class:`AccumulationOverride` takes the place of ``_TrainingEpochLoop._accumulated_batches_reached`` and
  ``_AutomaticOptimization._make_zero_grad_fn`` when the number of accumulated batches changes between
  optimizer steps (``GlobalBatchSize`` with a ramp-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

_PREFIX = "lightning_par/failure/"


class DeferredSigtermCheck:
    """Lightning's per-step SIGTERM check without its barrier (the strategy installs it under pipeline
    parallel).

    Lightning (2.6) broadcasts rank 0's SIGTERM flag at the start of every training step and reads it at
    once: a barrier. A pipeline rank that has finished its part of a step then waits for the rank still
    running the step's last backward, instead of going on to its optimizer step and its first forwards
    of the next step. Under ZBV that wait was 0.1-0.15 s of a 2.3 s step. Here the flag goes out
    asynchronously on a gloo group of its own and is read at the next step: every rank still stops at the
    same step, one step later than Lightning would.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        """``group``: a gloo group over the world that carries nothing else (``ParallelGroups.side_channel``)."""
        self.group = group
        self.trainer: Any = None
        self._pending: tuple[torch.Tensor, Any] | None = None

    def install(self, trainer: Any) -> bool:
        """Take the place of the training loop's check; False if this Lightning has none to replace."""
        loop = trainer.fit_loop.epoch_loop
        if not callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
            return False
        self.trainer = trainer
        loop._broadcast_sigterm_tensor = self
        return True

    def uninstall(self) -> None:
        """Wait for the last flag and give the loop its own check back."""
        if self._pending is not None:
            with contextlib.suppress(Exception):  # (after a failure a peer may be gone)
                self._pending[1].wait()
            self._pending = None
        if self.trainer is not None:
            vars(self.trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)
            self.trainer = None

    def __call__(self) -> None:
        if self._pending is not None:
            flag, work = self._pending
            self._pending = None
            work.wait()
            if flag.item():
                with contextlib.suppress(Exception):
                    dist.barrier(group=self.group)
                raise SIGTERMException()
        flag = torch.tensor([1 if getattr(self.trainer, "received_sigterm", False) else 0])
        self._pending = (flag, dist.broadcast(flag, src=0, group=self.group, async_op=True))


class AccumulationOverride:
    """Let a callback decide when an optimizer step ends and when gradients are zeroed.

    Lightning (2.6) decides both from ``batch_idx % accumulate_grad_batches``
    (``_TrainingEpochLoop._accumulated_batches_reached``, ``_AutomaticOptimization._make_zero_grad_fn``),
    which breaks when the number of micro-batches per step changes mid-epoch (a batch-size ramp-up).
    :meth:`install` replaces both on one trainer's loop objects; :meth:`uninstall` gives them back.

    Args:
        step_complete: ``True`` when the current optimizer step has taken all its micro-batches.
        first_micro_batch: ``True`` for the first micro-batch of a step (the one that zeroes gradients).
    """

    def __init__(self, step_complete: Callable[[], bool], first_micro_batch: Callable[[], bool]) -> None:
        self.step_complete = step_complete
        self.first_micro_batch = first_micro_batch
        self._replaced: list[tuple[Any, str]] = []

    def install(self, trainer: Any) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        optimization = epoch_loop.automatic_optimization
        for obj, name in ((epoch_loop, "_accumulated_batches_reached"), (optimization, "_make_zero_grad_fn")):
            if not callable(getattr(obj, name, None)):
                raise RuntimeError(
                    f"this Lightning ({pl.__version__}) has no {type(obj).__name__}.{name}: the batch-size "
                    f"ramp-up was written against Lightning 2.6 and cannot take over accumulation here."
                )

        def make_zero_grad_fn(batch_idx: int, optimizer: Any) -> Any:
            if optimization._skip_backward or not self.first_micro_batch():
                return None  # later micro-batches of the step accumulate into .grad

            def zero_grad_fn() -> None:
                optimization._on_before_zero_grad(optimizer)
                optimization._optimizer_zero_grad(batch_idx, optimizer)

            return zero_grad_fn

        epoch_loop._accumulated_batches_reached = self.step_complete
        optimization._make_zero_grad_fn = make_zero_grad_fn
        self._replaced = [(epoch_loop, "_accumulated_batches_reached"), (optimization, "_make_zero_grad_fn")]

    def uninstall(self) -> None:
        for obj, name in self._replaced:
            obj.__dict__.pop(name, None)
        self._replaced = []


def accumulates_further(trainer: Any) -> bool:
    """Whether Lightning's current micro-batch is not the last of its optimizer step (its own rule)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()
