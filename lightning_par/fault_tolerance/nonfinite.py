"""Non-finite losses and gradients: found on any rank, agreed by every rank, then stop or skip.

The flag is the whole model's gradient norm (:meth:`GradientSync.norm`), which every rank computes after the
gradient reduction and which is non-finite on every rank as soon as one rank's gradient is: no collective
of its own, and none at all when clipping is on (the clip reuses the same norm). Only when it is
non-finite do the ranks gather what each saw. ``"stop"`` raises :class:`NonFiniteError` on every rank at
the same step, naming the step, the ranks and each one's first non-finite parameter; ``"skip"`` drops the
step's update on every rank (all gradients set to None, so the optimizer leaves parameters and state as
they were; the learning-rate schedule still advances) and counts it. fp16 loss scaling has its own
overflow rule and is left to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_par.tensor_parallel.comm import local

POLICIES = ("stop", "skip", "off")


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite on some rank (the message says where)."""


class NonFiniteCheck:
    """Checks one optimizer step's loss and gradients over the whole world (see the module docstring)."""

    def __init__(self, policy: str = "stop") -> None:
        if policy not in POLICIES:
            raise ValueError(f"nonfinite={policy!r} is not valid; choose one of {list(POLICIES)}.")
        self.policy = policy
        self.skipped_steps = 0

    def check_step(self, grad_norm: Tensor, result: object, module: Any) -> None:
        """After a step's gradient reduction: the agreed norm, ``result`` (the closure's loss), the module."""
        loss = result if isinstance(result, Tensor) else None
        if self(grad_norm, loss, module.named_parameters(), module.trainer.global_step):
            module.log("train/skipped_nonfinite_steps", float(self.skipped_steps))

    def __call__(
        self, grad_norm: Tensor, loss: Tensor | None, named_params: Iterable[tuple[str, Tensor]], step: int
    ) -> bool:
        """``True`` when the step must be dropped (``skip``); raises under ``stop``."""
        if self.policy == "off" or bool(torch.isfinite(grad_norm)):
            return False
        named = [(n, p) for n, p in named_params if p.grad is not None]
        first = next((n for n, p in named if not torch.isfinite(local(p.grad)).all()), None)
        bad_loss = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        mine = (first, bad_loss)
        seen = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, mine)  # every rank is here: the norm is agreed
        if self.policy == "skip":
            for _, p in named:
                p.grad = None
            self.skipped_steps += 1
            return True
        found = []
        for r, (name, bad) in enumerate(seen):
            what = " and ".join(w for w, on in (("loss", bad), ("gradient", name is not None)) if on)
            if what:
                found.append(f"rank {r}: {what}" + (f" (first parameter: {name})" if name else ""))
        raise NonFiniteError(
            f"non-finite values at step {step}: {'; '.join(found) or 'the gradient norm'}. Training stopped "
            f"on every rank (nonfinite='stop'); nonfinite='skip' drops such steps instead."
        )
