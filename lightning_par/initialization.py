"""Initialising sharded parameters with the same numbers on every layout.

Every parameter is drawn from a generator seeded by the run's seed and the parameter's *global* name
(:func:`name_seed`), as a whole tensor, and each rank keeps its slice (:func:`fill_parameters`): a run on
tp=2 x pp=2 starts from exactly the model a one-process run starts from, so losses on different layouts
can be compared directly. A source may also read just this rank's slice (a checkpoint on disk).
Shared by every model family; models import it, it imports no model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


Shard = tuple[int, int, int]
"""``(dim, start, stop)``: the rows ``start:stop`` of dimension ``dim`` of a parameter's global tensor."""


def local_shard(param: Tensor) -> Shard | None:
    """The slice of the global tensor this rank holds, or ``None`` when it holds the whole tensor."""
    if not isinstance(param, DTensor):
        return None
    shard = None
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            if shard is not None:
                return None  # sharded over several mesh dims: let distribute_tensor slice
            dim = placement.dim % param.ndim
            size, rank = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
            if param.shape[dim] % size:
                return None
            step = param.shape[dim] // size
            shard = (dim, rank * step, (rank + 1) * step)
    return shard


@torch.no_grad()
def fill_parameters(module: nn.Module, source: Callable[..., Tensor], prefix: str = "") -> None:
    """Write ``source(name, global_shape, shard)`` into every parameter, keeping only this rank's shard.

    ``shard`` (see :func:`local_shard`) lets a source read just this rank's slice (a checkpoint on disk);
    a source may also return the whole tensor, which is then sliced here.
    """
    seen: set[int] = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        shard = local_shard(param)
        value = source(prefix + name, param.shape, shard)
        target = param.to_local() if isinstance(param, DTensor) else param
        if value.shape != target.shape:  # the source returned the whole tensor
            if shard is not None:
                dim, start, stop = shard
                value = value.narrow(dim, start, stop - start)
            else:
                value = distribute_tensor(
                    value.to(param.device, param.dtype),
                    param.device_mesh,
                    param.placements,
                    src_data_rank=None,
                ).to_local()
        target.copy_(value)
