"""Where a pipeline step meets Lightning's automatic optimization: gradients made inside ``training_step``.

Lightning runs ``training_step``, then ``zero_grad``, then ``backward``. Under pipeline parallel the
schedule runs every microbatch's backward inside ``training_step``, so the gradients exist before
Lightning zeroes them. :class:`GradientStash` sets them aside between ``training_step`` and ``backward``
and puts them back in ``backward`` (added to those of the step's earlier pipeline runs when a step
accumulates several, as under a batch-size ramp-up). With manual optimization the user's
``manual_backward`` comes after the schedule inside ``training_step``: nothing is stashed.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


class GradientStash:
    """Keeps the schedule's gradients out of the way of Lightning's ``zero_grad``."""

    def __init__(self) -> None:
        self._stashed: list[tuple[Tensor, Tensor]] = []
        self._earlier: list[tuple[Tensor, Tensor | None]] = []

    def begin(self, params: Iterable[Tensor], accumulating: bool) -> None:
        """Before the schedule runs: clear ``.grad`` (the gradients of earlier runs of the step wait aside)."""
        params = list(params)
        self._earlier = [(p, p.grad) for p in params] if accumulating else []
        for p in params:
            p.grad = None

    def end(self, params: Iterable[Tensor]) -> None:
        """After the schedule: take its gradients aside, give back the earlier runs' ones."""
        self._stashed = [(p, p.grad) for p in params if p.grad is not None]
        for p, _ in self._stashed:
            p.grad = None
        for p, grad in self._earlier:
            p.grad = grad
        self._earlier = []

    def restore(self) -> None:
        """In ``backward``: the schedule's gradients back into ``.grad`` (added to earlier runs' ones)."""
        for p, grad in self._stashed:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._stashed = []


def check_no_accumulation(accumulate_grad_batches: int, num_microbatches: int) -> None:
    """Lightning's accumulation on top of a schedule would accumulate twice: say what to use instead."""
    k = accumulate_grad_batches
    if k != 1:
        raise ValueError(
            f"accumulate_grad_batches={k} cannot be combined with pipeline parallel: the schedule already "
            f"accumulates gradients over its microbatches. Use num_microbatches={num_microbatches * k} (with a "
            f"batch {k}x larger) and accumulate_grad_batches=1."
        )
