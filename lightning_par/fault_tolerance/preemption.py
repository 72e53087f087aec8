"""Preemption: every rank learns at the same step boundary that some rank was told to stop.

SLURM and Kubernetes send SIGTERM before they kill a job, torchrun forwards it to its workers, and the
signal reaches the ranks at slightly different times: one may still be in step k while another has
started step k + 1. Lightning alone then stops each rank at the end of whatever step it is in. Here every
rank posts its flag after each optimizer step (an asynchronous all-reduce(MAX) on a gloo group of its
own) and reads the previous step's result: all ranks see a set flag after the same step and stop there,
one step after the first signal, without a barrier per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class PreemptionAgreement:
    """Call :meth:`step_end` after every optimizer step on every rank; ``True`` means stop here."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._signalled = False
        self._pending: tuple[torch.Tensor, dist.Work] | None = None

    def step_end(self, signalled: bool) -> bool:
        self._signalled |= signalled
        if self.group is None:  # one process: nothing to agree on
            return self._signalled
        if self._pending is not None:
            flag, work = self._pending
            self._pending = None
            work.wait()
            if flag.item():
                return True
        flag = torch.tensor([int(self._signalled)])
        self._pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return False

    def close(self) -> None:
        """Wait for the last posted flag (every rank posts the same number of times)."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
