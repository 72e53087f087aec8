"""Autograd functions of the sharded layers: local matmuls with hand-written collectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_par.tensor_parallel import (
    comm,
)  # called as comm.<name>: tests count collectives by wrapping them
from lightning_par.tensor_parallel.comm import TPInfo, _autocast


class _ColumnParallelLinearFn(torch.autograd.Function):
    """y = x W^T + b with W split by output rows. Input replicated (or sequence-sharded with SP).

    Forward needs no communication (SP: one all-gather of the input). Backward sums the input gradient
    over tp, issued asynchronously while the weight gradient computes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, info: TPInfo):  # type: ignore[override]
        x, weight, bias = _autocast(x, weight, bias)
        if info.sequence_parallel:
            x, _ = comm.all_gather_dim0(x, info.group)
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
                grad_x, work = comm.reduce_scatter_dim0(grad_x, info.group, async_op=True)
            else:
                work = comm.all_reduce(grad_x, info.group, async_op=True)
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
            y, _ = comm.reduce_scatter_dim0(y, info.group)
        elif pending is None:
            comm.all_reduce(y, info.group)
        else:
            pending.append(comm.all_reduce(y, info.group, async_op=True))
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        info: TPInfo = ctx.info
        if info.sequence_parallel:
            grad_out, _ = comm.all_gather_dim0(grad_out, info.group)
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
            out, _ = comm.reduce_scatter_dim0(x, info.group)
            return out
        x = x.clone()
        comm.all_reduce(x, info.group)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.info.sequence_parallel:
            grad, _ = comm.all_gather_dim0(grad, ctx.info.group)
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
        gathered, _ = comm.all_gather_dim0(stats, group)
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
