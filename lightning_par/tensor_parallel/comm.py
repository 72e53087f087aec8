"""Tensor-parallel communication primitives and :class:`TPInfo`, the role a sharded layer plays.

Everything the tensor-parallel layers send goes through the functions here, so tests can count
collectives by wrapping them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

# --------------------------------------------------------------------------------------------------------
# Communication primitives. Everything the tensor-parallel layers send goes through these four functions,
# so tests can count collectives by wrapping them.
# --------------------------------------------------------------------------------------------------------

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False) -> Any:
    """Sum ``tensor`` in place over ``group``."""
    return dist.all_reduce(tensor, group=group, async_op=async_op)


def all_gather_dim0(tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False) -> Any:
    """Concatenate every rank's ``tensor`` along dim 0; returns ``(output, work)``."""
    size = dist.get_world_size(group)
    out = tensor.new_empty((tensor.shape[0] * size, *tensor.shape[1:]))
    work = _all_gather_single(out, tensor.contiguous(), group=group, async_op=async_op)
    return out, work


def reduce_scatter_dim0(tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False) -> Any:
    """Sum over ``group`` and keep this rank's slice of dim 0; returns ``(output, work)``."""
    size = dist.get_world_size(group)
    if tensor.shape[0] % size:
        raise ValueError(
            f"sequence parallel needs the sequence length ({tensor.shape[0]}) divisible by "
            f"tensor_parallel_size ({size})."
        )
    out = tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
    work = _reduce_scatter_single(out, tensor.contiguous(), group=group, async_op=async_op)
    return out, work


# --------------------------------------------------------------------------------------------------------
# What a layer knows about its sharding (set by the plan styles; ``None`` means "not sharded").
# --------------------------------------------------------------------------------------------------------


@dataclass
class TPInfo:
    """The tensor-parallel role of one layer."""

    kind: str  # "column", "row", "vocab", "replicated"
    group: dist.ProcessGroup
    rank: int
    size: int
    sequence_parallel: bool
    comm_chunks: int = 1  # batch chunks the model interleaves to overlap forward all-reduces
    # "vocab" only: first vocabulary row held by this rank and the number of real (unpadded) rows.
    vocab_start: int = 0
    num_real_rows: int = 0


def local(t: Tensor | None) -> Tensor | None:
    """The local shard of a (possibly DTensor) parameter, differentiable."""
    if isinstance(t, DTensor):
        return t.to_local()
    return t


# --------------------------------------------------------------------------------------------------------
# Autograd functions (the conjugate pairs of Megatron's mappings).
# --------------------------------------------------------------------------------------------------------


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast to the autocast dtype when autocast is on (custom functions are not cast by autocast).

    The backward then runs in that dtype too, whether or not autocast is on there (Lightning runs backward
    outside it); autograd casts each returned gradient to its input's dtype (fp32 master weights).
    """
    ref = next(t for t in tensors if t is not None)
    device = ref.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
