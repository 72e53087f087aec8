"""Expert-parallel dispatch: tokens to their experts and back with ``all_to_all_single``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_par.experts.router import Routing


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse exchange.

    (``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:  # type: ignore[override]
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        recv_splits, send_splits = ctx.splits
        out = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def moe_forward(
    x: Tensor,
    routing: Routing,
    run_experts: Callable[[Tensor, list[int]], Tensor],
    num_experts: int,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """Send each kept assignment to its expert (all-to-all over ``group``), run the experts, combine.

    ``x`` is ``[N, C]``; ``run_experts(tokens, counts)`` gets this rank's experts' tokens, ``counts[e]`` for
    local expert ``e``, one expert after another, and returns their outputs in the same order. Returns
    ``[N, C]``: the sum over a token's kept choices of weight x expert(token).
    """
    N, k = routing.expert_index.shape
    ep = 1 if group is None else dist.get_world_size(group)
    e_local = num_experts // ep
    flat_expert = routing.expert_index.reshape(-1)
    token = torch.arange(N, device=x.device).repeat_interleave(k)
    assignment = routing.keep.reshape(-1).nonzero().squeeze(-1)
    expert = flat_expert[assignment]
    order = torch.argsort(expert, stable=True)  # expert-major: rank-major too, experts being in rank blocks
    assignment, expert = assignment[order], expert[order]
    send = x[token[assignment]]
    per_expert = torch.bincount(expert, minlength=num_experts)  # [E] tokens this rank sends to each expert

    if ep == 1:
        y = run_experts(send, per_expert.tolist())
    else:
        # Counts first: recv[r, e] tokens arrive from rank r for local expert e.
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=group)
        recv = recv_counts.view(ep, e_local)
        send_splits = per_expert.view(ep, e_local).sum(dim=1).tolist()
        recv_splits = recv.sum(dim=1).tolist()
        received = _AllToAll.apply(send, recv_splits, send_splits, group)
        # Received rows are grouped by source rank, then by expert: regroup by expert for the matmuls.
        src_expert = torch.arange(e_local, device=x.device).repeat(ep).repeat_interleave(recv.reshape(-1))
        regroup = torch.argsort(src_expert, stable=True)
        out = run_experts(received[regroup], recv.sum(dim=0).tolist())
        back = torch.empty_like(out).index_copy(0, regroup, out)  # undo the regrouping (differentiable)
        y = _AllToAll.apply(back, send_splits, recv_splits, group)

    weight = routing.weights.reshape(-1)[assignment].unsqueeze(-1)
    # (Under autocast the experts compute in bf16/fp16; the combination keeps the residual stream's dtype.)
    return torch.zeros_like(x).index_add(0, token[assignment], (y * weight.to(y.dtype)).to(x.dtype))


class _GatherSequence(torch.autograd.Function):
    """Sequence parallel: all-gather the sequence shards (dim 0) so a MoE layer routes whole sequences.

    Every tp rank then computes the same MoE output and the same gradient for it, so the backward keeps
    this rank's slice of that (identical) gradient: no reduction.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=0)[rank].contiguous(), None


class _ScatterSequence(torch.autograd.Function):
    """Sequence parallel: keep this rank's sequence shard of a (tp-replicated) MoE output.

    The backward all-gathers the shards' gradients, so every tp rank back-propagates the same whole
    gradient through the experts (whose tensor-parallel backward needs identical upstream gradients).
    """

    @staticmethod
    def forward(ctx, y: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return y.chunk(size, dim=0)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _GatherSequence.forward(ctx, grad, ctx.group), None
