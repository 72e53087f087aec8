"""Gradient reductions and norms of the parallel layouts: bucketed collectives, no per-parameter calls.

Used by :class:`lightning_par.strategy.HybridParallelStrategy` after each backward: sequence-parallel
partial sums over tp, replicas combined over dp, and the global norm for clipping.
"""

from __future__ import annotations

from collections.abc import Iterable

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
