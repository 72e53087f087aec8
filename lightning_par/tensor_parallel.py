"""Megatron-style tensor parallelism: the layers, their communication, and the plan styles that shard them.

How it fits together:

* The model is written once with the layers below (:class:`ParallelLinear`, :class:`ParallelEmbedding`,
  :class:`LayerNorm`). Without a plan applied they are ordinary ``nn.Linear`` / ``nn.Embedding`` /
  ``nn.LayerNorm`` and the model runs in one process.
* A tensor-parallel plan is data: ``{"layers.*.attn.qkv": ColumnParallel(), ...}``, applied with torch's
  ``parallelize_module``. Our styles are torch ``ParallelStyle`` subclasses: they turn each parameter into a
  ``DTensor`` on the tp mesh (``Shard(0)`` / ``Shard(1)`` / ``Replicate()``), so checkpoints (DCP),
  ``full_tensor()`` and resharding work as for any DTensor model, and they tell the layer its role.
* The forward and backward of a sharded layer run on the local shards with hand-written collectives
  (autograd Functions below) instead of DTensor dispatch: on CPU the DTensor path costs about a fifth of
  the step in dispatch and redistribution, and it cannot leave an all-reduce in flight while other work
  computes (the backward input-gradient all-reduce behind the weight-gradient matmul; in forward, one
  batch chunk's all-reduce behind the other chunk's block, see ``models/blocks.forward_interleaved``).

Activations inside the model are sequence-first, ``[T, B, C]`` (as in Megatron): with sequence parallel
the sequence shard of each rank is then a contiguous slice of rows, so all-gather and reduce-scatter
work in place on dim 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

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


class _ColumnParallelLinearFn(torch.autograd.Function):
    """y = x W^T + b with W split by output rows. Input replicated (or sequence-sharded with SP).

    Forward needs no communication (SP: one all-gather of the input). Backward sums the input gradient
    over tp, issued asynchronously while the weight gradient computes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, info: TPInfo):  # type: ignore[override]
        x, weight, bias = _autocast(x, weight, bias)
        if info.sequence_parallel:
            x, _ = all_gather_dim0(x, info.group)
        ctx.save_for_backward(x, weight)
        ctx.info = info
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        info: TPInfo = ctx.info
        out_features, in_features = weight.shape
        g2 = grad_out.reshape(-1, out_features)
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(weight).view(*x.shape)
            if info.sequence_parallel:
                grad_x, work = reduce_scatter_dim0(grad_x, info.group, async_op=True)
            else:
                work = all_reduce(grad_x, info.group, async_op=True)
        # The weight gradient computes while the input gradient is being summed over tp.
        grad_w = g2.t().mm(x.reshape(-1, in_features)) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None


class _RowParallelLinearFn(torch.autograd.Function):
    """y = sum over tp of x_r W_r^T with W split by input columns; bias is added by the caller.

    Forward all-reduces the partial outputs (SP: reduce-scatters them by sequence). Given a ``pending``
    list, the all-reduce is issued asynchronously and its handle appended there: the caller waits before
    reading ``y`` and meanwhile computes something else (another chunk of the batch). Backward needs no
    communication (SP: one all-gather of the output gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, info: TPInfo, pending: list | None = None):  # type: ignore[override]
        x, weight = _autocast(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.info = info
        y = x.reshape(-1, x.shape[-1]).mm(weight.t()).view(*x.shape[:-1], weight.shape[0])
        if info.sequence_parallel:
            y, _ = reduce_scatter_dim0(y, info.group)
        elif pending is None:
            all_reduce(y, info.group)
        else:
            pending.append(all_reduce(y, info.group, async_op=True))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        info: TPInfo = ctx.info
        if info.sequence_parallel:
            grad_out, _ = all_gather_dim0(grad_out, info.group)
        g2 = grad_out.reshape(-1, weight.shape[0])
        grad_x = g2.mm(weight).view(*x.shape) if ctx.needs_input_grad[0] else None
        grad_w = g2.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: sum partial results over tp (SP: reduce-scatter by sequence). Backward: the adjoint."""

    @staticmethod
    def forward(ctx, x, info: TPInfo):  # type: ignore[override]
        ctx.info = info
        if info.sequence_parallel:
            out, _ = reduce_scatter_dim0(x, info.group)
            return out
        x = x.clone()
        all_reduce(x, info.group)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.info.sequence_parallel:
            grad, _ = all_gather_dim0(grad, ctx.info.group)
        return grad, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary; the full ``[tokens, vocab]`` tensor never exists.

    Each rank computes the log-sum-exp of its slice (one fused pass, no temporary the size of the
    logits) and the target logit where it owns the target; one all-gather of those two small per-token
    numbers gives the global log-sum-exp and target logit. Softmax is formed only in backward.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):  # type: ignore[override]
        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= logits.shape[-1])
        local_target = local_target.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        stats = torch.stack([torch.logsumexp(logits, dim=-1), target_logit])
        gathered, _ = all_gather_dim0(stats, group)
        gathered = gathered.view(-1, *stats.shape)  # [tp, 2, ...]
        lse = torch.logsumexp(gathered[:, 0], dim=0)
        ctx.save_for_backward(logits, lse, local_target, outside)
        return lse - gathered[:, 1].sum(dim=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        logits, lse, local_target, outside = ctx.saved_tensors
        grad = torch.sub(logits, lse.unsqueeze(-1)).exp_()  # this rank's slice of the softmax
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


# --------------------------------------------------------------------------------------------------------
# Layers: ordinary torch layers until a style gives them a TPInfo.
# --------------------------------------------------------------------------------------------------------


class ParallelLinear(nn.Linear):
    """``nn.Linear`` that runs column- or row-parallel once a :class:`ColumnParallel` /
    :class:`RowParallel` style has been applied to it."""

    tp: TPInfo | None = None

    def forward(self, x: Tensor) -> Tensor:
        info = self.tp
        if info is None:
            return F.linear(x, self.weight, self.bias)
        if info.kind == "column":
            return _ColumnParallelLinearFn.apply(x, local(self.weight), local(self.bias), info)
        return self.add_bias(_RowParallelLinearFn.apply(x, local(self.weight), info))

    def forward_deferred(self, x: Tensor, pending: list) -> Tensor:
        """Row-parallel matmul whose all-reduce is left in flight (handle appended to ``pending``).

        Read the result only after waiting on ``pending``, then call :meth:`add_bias`. Without tensor
        parallel this is the plain matmul and nothing is pending.
        """
        info = self.tp
        if info is None:
            return F.linear(x, self.weight)
        if info.kind != "row":
            raise ValueError(f"forward_deferred is for row-parallel layers, not {info.kind!r} ones.")
        return _RowParallelLinearFn.apply(
            x, local(self.weight), info, None if info.sequence_parallel else pending
        )

    def add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + local(self.bias)


class ParallelEmbedding(nn.Embedding):
    """``nn.Embedding`` split by vocabulary rows once a :class:`VocabParallel` style is applied.

    Input ids are ``[T, B]``; each rank looks up the ids it owns, zeros the others, and the partial
    embeddings are summed over tp (SP: reduce-scattered so each rank keeps its sequence shard).
    """

    tp: TPInfo | None = None

    def forward(self, ids: Tensor) -> Tensor:
        info = self.tp
        if info is None:
            return F.embedding(ids, self.weight)
        weight = local(self.weight)
        local_ids = ids - info.vocab_start
        outside = (local_ids < 0) | (local_ids >= weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceFromTP.apply(out, info)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose (replicated) DTensor parameters are used through their local values."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, local(self.weight), local(self.bias), self.eps)


def vocab_parallel_cross_entropy(
    logits: Tensor, target: Tensor, info: TPInfo | None, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy summed over counted tokens, and the number of counted tokens.

    ``logits`` is ``[..., V_local]`` (this rank's vocabulary slice when ``info`` is given, the whole
    vocabulary otherwise); vocabulary rows past ``info.num_real_rows`` (padding) are masked out, so padded
    rows never change the loss. Returns ``(loss_sum, num_tokens)`` so callers can weight by tokens.
    """
    counted = target != ignore_index
    num_tokens = counted.sum()
    safe_target = target.masked_fill(~counted, 0)
    if info is None:
        loss = F.cross_entropy(logits.float().flatten(0, -2), safe_target.flatten(), reduction="none")
        return (loss * counted.flatten()).sum(), num_tokens
    logits = logits.float()
    real_local = info.num_real_rows - info.vocab_start
    if real_local < logits.shape[-1]:
        pad = torch.arange(logits.shape[-1], device=logits.device) >= real_local
        logits = logits.masked_fill(pad, float("-inf"))
    loss = _VocabParallelCrossEntropy.apply(logits, safe_target, info.vocab_start, info.group)
    return (loss * counted).sum(), num_tokens


# --------------------------------------------------------------------------------------------------------
# Plan styles.
# --------------------------------------------------------------------------------------------------------


def _to_dtensor(param: nn.Parameter, mesh: DeviceMesh, placement: Any) -> nn.Parameter:
    """Shard a parameter without communication: every rank holds the same full value (or meta)."""
    dt = distribute_tensor(param.data, mesh, [placement], src_data_rank=None)
    return nn.Parameter(dt, requires_grad=param.requires_grad)


class _TPStyle(ParallelStyle):
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


class ColumnParallel(_TPStyle):
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


class RowParallel(_TPStyle):
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


class VocabParallel(_TPStyle):
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


class Replicated(_TPStyle):
    """Keep a module's parameters whole on every tp rank, as ``Replicate()`` DTensors.

    Under sequence parallel the module runs on sequence shards and its gradients are partial sums.
    """

    kind = "replicated"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        self._replicate_params(module, device_mesh, [n for n, _ in module.named_parameters(recurse=False)])
        module.tp = self._info(device_mesh)
        return module
