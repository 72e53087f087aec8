"""Non-finite losses and gradients: found on any rank, then stop (default) or skip the step everywhere.

* ``"stop"`` with clipping on: the flag is the step's global gradient norm (:meth:`GradientSync.norm`),
  which the clip needs anyway and which is non-finite on every rank as soon as one rank's gradient is: no
  collective of its own. Every rank raises :class:`NonFiniteError` at the same step, naming the step, the
  ranks and each one's first non-finite parameter (gathered only then).
* ``"stop"`` without clipping: each rank checks its own gradients (no collective, so pipeline ranks keep
  overlapping one step's end with the next: the agreed norm's all-reduce over pp cost about 4% of a pp=2
  step here). A rank that finds a non-finite value raises, naming the step, itself and the parameter,
  and the failure watchdog ends the others with that message within about a second.
* ``"skip"``: always the agreed norm; every rank drops the step's update (all gradients set to None, so
  the optimizer leaves parameters and state as they were; the learning-rate schedule still advances).
* fp16 loss scaling has its own overflow rule and is left to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def check_step(
        self,
        result: object,
        module: Any,
        agreed_norm: Callable[[], Tensor],
        named: Iterable[tuple[str, Tensor]] | None = None,
    ) -> None:
        """After a step's gradient reduction; ``agreed_norm()`` is the step's global gradient norm.

        ``named``: the tensors whose ``.grad`` the optimizer steps, by name (default: the module's
        parameters; the distributed optimizer's pieces hold the reduced gradients instead).
        """
        if self.policy == "off":
            return
        trainer = module.trainer
        clipping = bool(trainer.gradient_clip_val) and (trainer.gradient_clip_algorithm or "norm") == "norm"
        loss = result if isinstance(result, Tensor) else None
        step = trainer.global_step
        named = list(named if named is not None else module.named_parameters())
        if self.policy == "stop" and not clipping:
            self._check_locally(loss, named, step)
        elif self(agreed_norm(), loss, named, step):
            module.log("train/skipped_nonfinite_steps", float(self.skipped_steps))

    def _check_locally(
        self, loss: Tensor | None, named_params: Iterable[tuple[str, Tensor]], step: int
    ) -> None:
        named = [(n, local(p.grad)) for n, p in named_params if p.grad is not None]
        grads = [g for _, g in named]
        total = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros(())
        bad_loss = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if bool(torch.isfinite(total)) and not bad_loss:
            return
        first = next((n for n, g in named if not torch.isfinite(g).all()), None)
        rank = dist.get_rank() if dist.is_initialized() else 0
        what = " and ".join(w for w, on in (("loss", bad_loss), ("gradient", first is not None)) if on)
        raise NonFiniteError(
            f"non-finite values at step {step}: rank {rank}: {what}"
            + (f" (first parameter: {first})" if first else "")
            + ". Training stopped (nonfinite='stop'); nonfinite='skip' drops such steps instead."
        )

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
