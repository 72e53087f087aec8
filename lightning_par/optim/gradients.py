"""Gradient reductions and norms of the parallel layouts: bucketed collectives, no per-parameter calls.

Used by :class:`lightning_par.strategy.HybridParallelStrategy` after each backward
(:class:`GradientSync`): sequence-parallel partial sums over tp, replicas combined over dp (experts over
their expert-data-parallel group), tied weights summed across pipeline ranks, and the global norm for
clipping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer


def local(t: Tensor) -> Tensor:
    """This rank's shard of a (possibly DTensor) gradient: collectives act on plain tensors."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_replicated_dtensor(t: Tensor) -> bool:
    """A DTensor whole on every rank of its mesh (LayerNorm, biases of row-parallel layers, ...)."""
    return isinstance(t, DTensor) and all(isinstance(p, Replicate) for p in t.placements)


def optimizer_params(optimizer: Optimizer) -> Iterable[Tensor]:
    """Every parameter an optimizer (or Lightning's wrapper of it) updates."""
    opt = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the real one
    for group in opt.param_groups:
        yield from group["params"]


def sum_squares(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Sum of squares of all elements, in fp32, with one fused norm kernel per call."""
    if not tensors:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch._foreach_norm([t.float() for t in tensors])
    return torch.stack(norms).pow(2).sum()


def bucket_all_reduce(tensors: list[Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """All-reduce many tensors as one flat buffer per dtype, then scale and copy back."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = _flatten_dense_tensors(group_tensors)
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        for t, synced in zip(group_tensors, _unflatten_dense_tensors(flat, group_tensors), strict=True):
            t.copy_(synced)


@dataclass
class GradientSync:
    """Which group each kind of gradient is reduced over, and how the global norm adds up.

    Built by the strategy once the model is sharded. Groups are ``None`` where their size is 1.

    * dense parameters: summed over ``dp`` (the data-parallel replicas);
    * experts (``expert_ids``): over ``edp``, the replicas that hold the same experts (expert parallel is
      carved out of dp; each expert already has the contributions of every token its ep group sent it);
    * under sequence parallel, replicated parameters first sum their partial gradients over ``tp``,
      except those of MoE layers (``moe_ids``), which see whole gathered sequences;
    * weights tied across pipeline ranks (``tied``: names and the group of ranks holding a copy) sum their
      parts, and the norm counts the extra copies (``norm_duplicates``) once.
    """

    tp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    edp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    sequence_parallel: bool = False
    expert_ids: set[int] = field(default_factory=set)
    moe_ids: set[int] = field(default_factory=set)
    tied: list[tuple[list[str], dist.ProcessGroup]] = field(default_factory=list)
    norm_duplicates: set[int] = field(default_factory=set)

    @torch.no_grad()
    def reduce(
        self,
        params: Iterable[Tensor],
        named: dict[str, Tensor],
        scale: float | None,
        replicas_done: bool = False,
    ) -> None:
        """Reduce every gradient over its group(s), multiplied by ``scale`` (``None``: no dp reduction).

        ``replicas_done``: the data-parallel buckets already summed (and scaled) every gradient that has
        replicas; only those without are scaled here.
        """
        params = [p for p in params if p.grad is not None]
        self.sum_sequence_parallel([local(p.grad) for p in params if self.tp_partial(p)])
        if scale is not None:
            dense = [local(p.grad) for p in params if id(p) not in self.expert_ids]
            experts = [local(p.grad) for p in params if id(p) in self.expert_ids]
            for group, tensors in ((self.dp, dense), (self.edp, experts)):
                if group is not None:
                    if not replicas_done:
                        bucket_all_reduce(tensors, group, scale=scale)
                elif tensors and scale != 1.0:
                    torch._foreach_mul_(tensors, scale)
        self.sum_ties(named)

    def tp_partial(self, p: Tensor) -> bool:
        """Under sequence parallel, a replicated parameter's gradient is a partial sum over tp (except in
        MoE layers, which see whole gathered sequences)."""
        return (
            self.sequence_parallel
            and self.tp is not None
            and is_replicated_dtensor(p)
            and id(p) not in self.moe_ids
        )

    def sum_sequence_parallel(self, grads: list[Tensor]) -> None:
        """Complete the tp partial sums (any order against the data-parallel sum: both are sums)."""
        if grads and self.tp is not None:
            bucket_all_reduce(grads, self.tp, scale=1.0)

    def sum_ties(self, named: dict[str, Tensor]) -> None:
        """A weight tied across pipeline ranks (embedding on the first stage, head on the last) got one part
        of its gradient on each: sum them, so both copies take the same step."""
        for names, group in self.tied:
            grads = [local(named[n].grad) for n in names if n in named and named[n].grad is not None]
            bucket_all_reduce(grads, group, scale=1.0)

    @torch.no_grad()
    def norm(self, params: Iterable[Tensor], device: torch.device) -> Tensor:
        """The L2 norm of the whole (unsharded) model's gradient, each parameter counted once.

        Sharded parameters add their shard's squares, summed over tp; replicated ones are the same on every
        tp rank and are added once. Experts differ over the ep group (summed over it); pipeline stages hold
        different parameters (summed over pp, the second copy of a tied weight left out). Data-parallel
        replicas already agree. A NaN or Inf in any rank's gradient makes the norm non-finite on every rank
        (replicas through the gradient reduction, the rest through these all-reduces).
        """
        # [dense sharded, dense replicated, expert sharded, expert replicated]
        parts: list[list[Tensor]] = [[], [], [], []]
        for p in params:
            if p.grad is None or id(p) in self.norm_duplicates:
                continue
            parts[self.norm_kind(p)].append(local(p.grad))
        return self.combine_squares(torch.stack([sum_squares(part, device) for part in parts])).sqrt()

    def norm_kind(self, p: Tensor) -> int:
        """Where ``p``'s squares go in :meth:`combine_squares`: dense/expert x tp-sharded/replicated."""
        kind = 0 if isinstance(p, DTensor) and not is_replicated_dtensor(p) else 1
        return kind + (2 if id(p) in self.expert_ids else 0)

    def combine_squares(self, sq: Tensor) -> Tensor:
        """The squared global norm from this rank's ``[dense sharded, dense replicated, expert sharded,
        expert replicated]`` sums of squares (already complete over data-parallel replicas)."""
        if self.tp is not None:
            # 0 * replicated adds nothing to a finite norm (bitwise) but carries a NaN/Inf of a replicated
            # gradient on one tp rank to all of them: a non-finite norm is then agreed by every rank.
            sharded = (sq[0::2] + 0 * sq[1::2]).contiguous()
            dist.all_reduce(sharded, group=self.tp)
            sq[0::2] = sharded
        expert = sq[2] + sq[3]
        if self.ep is not None:
            dist.all_reduce(expert, group=self.ep)
        total = sq[0] + sq[1] + expert
        if self.pp is not None:
            dist.all_reduce(total, group=self.pp)
        return total


class StepTokens:
    """The counted tokens of one optimizer step's micro-batches, for an exact token-weighted mean.

    Each micro-batch's ``training_step`` reports ``num_tokens``. When a step has several micro-batches
    (accumulation) or replicas, Lightning's mean-of-means is not the token-weighted mean of the global
    batch: the strategy then makes each micro-batch's loss its token sum (:meth:`as_token_sum`) and
    divides the summed gradients by the global batch's token count (:meth:`gradient_scale`).
    """

    def __init__(self) -> None:
        self.counts: list[Tensor] = []
        self.grads_are_sums = False

    def record(self, output: object) -> None:
        if isinstance(output, dict) and isinstance(output.get("num_tokens"), Tensor):
            self.counts.append(output["num_tokens"].detach())

    def as_token_sum(self, loss: Tensor, accumulate: int) -> Tensor:
        """Lightning's closure gave ``mean / accumulate``: this micro-batch's token sum instead."""
        self.grads_are_sums = True
        return loss * (self.counts[-1] * accumulate)

    def gradient_scale(self, dp: dist.ProcessGroup | None, pipelined: bool) -> float | None:
        """The factor for the step's gradients before they are summed over ``dp`` (``None``: no reduction).

        Resets for the next step.
        """
        scale = None
        if self.grads_are_sums:
            # Token sums of every micro-batch on every replica: divide by the global batch's tokens.
            total = torch.stack(self.counts).sum().to(torch.float64)
            if dp is not None:
                dist.all_reduce(total, group=dp)
            scale = 1.0 / float(total.clamp(min=1))
        elif dp is not None:
            # Under pipeline parallel each replica already divided by the global batch's tokens: sum.
            scale = 1.0 if pipelined else 1.0 / dist.get_world_size(dp)
        self.counts, self.grads_are_sums = [], False
        return scale
