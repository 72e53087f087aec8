"""Tensor-parallel plan styles: torch ``ParallelStyle`` subclasses that shard a layer's parameters as DTensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.tensor_parallel.comm import TPInfo
from lightning_par.tensor_parallel.layers import ParallelEmbedding, ParallelLinear


def _to_dtensor(param: nn.Parameter, mesh: DeviceMesh, placement: Any) -> nn.Parameter:
    """Shard a parameter without communication: every rank holds the same full value (or meta)."""
    dt = distribute_tensor(param.data, mesh, [placement], src_data_rank=None)
    return nn.Parameter(dt, requires_grad=param.requires_grad)


class TPStyle(ParallelStyle):
    """Base of the package's styles: tells each sharded layer its role (a :class:`TPInfo`).

    ``comm_chunks`` is a speed option of the run, set by :func:`lightning_par.parallelize.parallelize`
    from the strategy's ``tp_comm_chunks``; a model's plan leaves it at 1.
    """

    kind = ""
    module_types: tuple[type, ...] = ()

    def __init__(self, sequence_parallel: bool = False, comm_chunks: int = 1) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.comm_chunks = comm_chunks

    def _info(self, mesh: DeviceMesh, **kw: Any) -> TPInfo:
        return TPInfo(
            kind=self.kind,
            group=mesh.get_group(),
            rank=mesh.get_local_rank(),
            size=mesh.size(),
            sequence_parallel=self.sequence_parallel,
            comm_chunks=self.comm_chunks,
            **kw,
        )

    def _check(self, module: nn.Module, mesh: DeviceMesh) -> None:
        if mesh.ndim != 1:
            raise ValueError("tensor-parallel styles take the 1-D tp sub-mesh, e.g. mesh['tp'].")
        if self.module_types and not isinstance(module, self.module_types):
            names = ", ".join(t.__name__ for t in self.module_types)
            raise TypeError(f"{type(self).__name__} applies to {names}, not {type(module).__name__}.")

    def _replicate_params(self, module: nn.Module, mesh: DeviceMesh, names: Sequence[str]) -> None:
        for name in names:
            param = getattr(module, name, None)
            if param is not None and not isinstance(param, DTensor):
                # Under sequence parallel each rank sees only its sequence shard, so the gradient of a
                # replicated parameter is a partial sum: the strategy sums it over tp before the step.
                module.register_parameter(name, _to_dtensor(param, mesh, Replicate()))


class ColumnParallel(TPStyle):
    """Split a linear layer's output features over tp (weight and bias ``Shard(0)``)."""

    kind = "column"
    module_types = (ParallelLinear,)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        if module.out_features % device_mesh.size():
            raise ValueError(
                f"ColumnParallel: out_features={module.out_features} is not divisible by "
                f"tensor_parallel_size={device_mesh.size()}."
            )
        module.register_parameter("weight", _to_dtensor(module.weight, device_mesh, Shard(0)))
        if module.bias is not None:
            module.register_parameter("bias", _to_dtensor(module.bias, device_mesh, Shard(0)))
        module.tp = self._info(device_mesh)
        return module


class RowParallel(TPStyle):
    """Split a linear layer's input features over tp (weight ``Shard(1)``, bias replicated)."""

    kind = "row"
    module_types = (ParallelLinear,)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        if module.in_features % device_mesh.size():
            raise ValueError(
                f"RowParallel: in_features={module.in_features} is not divisible by "
                f"tensor_parallel_size={device_mesh.size()}."
            )
        module.register_parameter("weight", _to_dtensor(module.weight, device_mesh, Shard(1)))
        self._replicate_params(module, device_mesh, ["bias"])
        module.tp = self._info(device_mesh)
        return module


class VocabParallel(TPStyle):
    """Split an embedding (or an output head) by vocabulary rows (``Shard(0)``).

    ``num_real_rows`` is the unpadded vocabulary size: rows past it are padding and are masked in the
    loss. The row count must divide by tp (the model pads its vocabulary so that it does).
    """

    kind = "vocab"
    module_types = (ParallelEmbedding, ParallelLinear)

    def __init__(self, num_real_rows: int, sequence_parallel: bool = False, comm_chunks: int = 1) -> None:
        super().__init__(sequence_parallel, comm_chunks)
        self.num_real_rows = num_real_rows

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        rows = module.weight.shape[0]
        size = device_mesh.size()
        if rows % size:
            raise ValueError(
                f"VocabParallel: the (padded) vocabulary has {rows} rows, not divisible by "
                f"tensor_parallel_size={size}; pad it to a multiple of {size}."
            )
        module.register_parameter("weight", _to_dtensor(module.weight, device_mesh, Shard(0)))
        start = device_mesh.get_local_rank() * (rows // size)
        info = self._info(device_mesh, vocab_start=start, num_real_rows=self.num_real_rows)
        if isinstance(module, ParallelLinear):
            # An output head: a column-parallel linear whose logits stay split (no gather).
            info.kind = "column"
        module.tp = info
        return module


class Replicated(TPStyle):
    """Keep a module's parameters whole on every tp rank, as ``Replicate()`` DTensors.

    Under sequence parallel the module runs on sequence shards and its gradients are partial sums.
    """

    kind = "replicated"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        self._replicate_params(module, device_mesh, [n for n, _ in module.named_parameters(recurse=False)])
        module.tp = self._info(device_mesh)
        return module
