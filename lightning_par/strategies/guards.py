"""What watches a training run on every rank: failures, hangs, and the SIGTERM flag without a barrier.

The strategy arms these at ``on_train_start`` and disarms them at the end of fit:

* :class:`~lightning_par.fault_tolerance.watchdog.FailureWatchdog`: a rank that raises ends the others
  with its message; with ``hang_timeout``, a rank that stops making progress ends the run with the stuck
  rank's step and stack (progress is marked after each training step, validation step and optimizer
  step);
* :class:`~lightning_par.strategies.lightning_patches.DeferredSigtermCheck` under pipeline parallel.

:class:`GuardedRun` is the strategy's side: the hooks that arm and disarm them, and the process group made
per restart attempt.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from lightning_par.distributed.groups import ParallelGroups
from lightning_par.fault_tolerance.restart import init_elastic_process_group
from lightning_par.fault_tolerance.watchdog import FailureWatchdog
from lightning_par.strategies.lightning_patches import DeferredSigtermCheck


class RunGuards:
    """Arm, feed and disarm the run's watchers (see the module docstring)."""

    def __init__(self, hang_timeout: float | None) -> None:
        if hang_timeout is not None and (isinstance(hang_timeout, bool) or not hang_timeout > 0):
            raise ValueError(f"hang_timeout={hang_timeout!r} is not valid: it must be None or seconds > 0.")
        self.hang_timeout = hang_timeout
        self.watchdog: FailureWatchdog | None = None
        self.sigterm_check: DeferredSigtermCheck | None = None

    def start(self, trainer: Any, groups: ParallelGroups, rank: int) -> None:
        if dist.get_world_size() < 2:
            return
        # From here on a rank that fails ends the others within seconds, whatever they are blocked in.
        self.watchdog = FailureWatchdog.for_process_group(rank, hang_timeout=self.hang_timeout)
        if self.watchdog is not None:
            self.watchdog.progress(trainer.global_step)
            self.watchdog.start()
        if groups.layout.pp > 1:
            # No barrier at the start of each step: pipeline ranks overlap one step's end with the next.
            self.sigterm_check = self.sigterm_check or DeferredSigtermCheck(groups.side_channel("sigterm"))
            self.sigterm_check.install(trainer)

    def progress(self, step: int) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(step)

    def report(self, exception: BaseException) -> None:
        if self.watchdog is not None:
            self.watchdog.report(exception)

    def stop(self) -> None:
        if self.sigterm_check is not None:
            self.sigterm_check.uninstall()
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None


class GuardedRun:
    """Strategy hooks (a mixin of :class:`HybridParallelStrategy`): the guards' lifetime, per-attempt stores."""

    _guards: RunGuards

    def _setup_distributed(self) -> None:
        # Under torchrun, each restart attempt gets its own namespace of the agent's store.
        assert self.cluster_environment is not None
        env = self.cluster_environment
        init_elastic_process_group(
            self._get_process_group_backend(), env.global_rank(), env.world_size(), self._timeout
        )
        super()._setup_distributed()

    def on_train_start(self) -> None:
        super().on_train_start()
        if dist.is_initialized():
            self._guards.start(self.lightning_module.trainer, self.groups, self.global_rank)

    def on_train_end(self) -> None:
        self._guards.stop()
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        self._guards.report(exception)
        super().on_exception(exception)

    def teardown(self) -> None:
        self._guards.stop()
        super().teardown()
