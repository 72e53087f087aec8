"""Mixture of experts: a top-k router (load-balancing and z losses, capacity) and expert-parallel dispatch.

Where this sits: a GPT block whose MLP is a :class:`MoE` routes each token to ``top_k`` of ``num_experts``
expert MLPs. Under expert parallelism (``expert_parallel_size = ep``) the strategy calls
:meth:`MoE.shard_experts`, after which each rank of the ep group holds ``num_experts / ep`` experts, and
tokens travel to their experts and back with one ``all_to_all_single`` each way (uneven split sizes,
differentiable through ``torch.distributed.nn.functional``). Nothing loops over tokens; the loop over a
rank's own experts is a handful of matmuls.

Experts live in an ``nn.ModuleDict`` keyed by their *global* index (``experts.5.fc.weight`` on whichever
rank holds expert 5), so parameter names, and checkpoints, do not depend on ep.

Routing groups are sequences: capacity and the load-balancing loss are computed per sequence, so which
tokens are dropped and what the loss is do not depend on how sequences are spread over ranks and
microbatches. Dropped assignments contribute nothing; the token keeps its residual.

The auxiliary losses enter the training loss as sums, like the token loss: a MoE layer adds
``aux_loss_coef * T * sum_over_sequences(aux) + z_loss_coef * sum_over_tokens(z)`` (T tokens per sequence),
and the model divides the total by the global batch's token count. With every token counted that is the
familiar ``coef * mean_sequence(aux) + z_coef * mean_token(z)``. Without pipeline parallel the model adds
the terms to its loss (:meth:`MoE.pop_aux`); under pipeline parallel a layer on an earlier stage cannot
reach the last stage's loss, so its gradient is injected in backward with the pipeline's loss scale
(:attr:`MoE.aux_grad_scale`, set by the runner).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Where each token goes. ``N`` tokens, ``k`` choices each, in ``S`` sequences (routing groups)."""

    expert_index: Tensor  # [N, k] int64, global expert indices
    weights: Tensor  # [N, k] the router weights the expert outputs are combined with
    keep: Tensor  # [N, k] bool: False where the expert was over capacity (the assignment is dropped)
    aux_loss_sum: Tensor  # sum over sequences of the Switch loss E * sum_e fraction_e * mean_probability_e
    z_loss_sum: Tensor  # sum over tokens of logsumexp(logits)^2
    load: Tensor  # [E] kept assignments per expert
    num_sequences: int

    @property
    def aux_loss(self) -> Tensor:
        """The load-balancing loss, averaged over sequences."""
        return self.aux_loss_sum / max(self.num_sequences, 1)

    @property
    def z_loss(self) -> Tensor:
        """The router z-loss, averaged over tokens."""
        return self.z_loss_sum / max(self.expert_index.shape[0], 1)

    @property
    def dropped_fraction(self) -> Tensor:
        return 1.0 - self.keep.float().mean()


def check_moe(
    num_experts: int, top_k: int, capacity_factor: float | None, expert_parallel_size: int = 1
) -> None:
    """Raise, naming the value and what would be valid, for settings a MoE layer cannot run."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} is not valid: it must be an integer >= 1.")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"moe_top_k={top_k!r} is not valid: it must be between 1 and num_experts={num_experts}."
        )
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(
            f"moe_capacity_factor={capacity_factor!r} is not valid: it must be > 0, or None for dropless routing."
        )
    if num_experts % expert_parallel_size:
        valid = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} does not divide num_experts={num_experts}; "
            f"valid expert_parallel_size: {valid}."
        )


class TopKRouter(nn.Module):
    """Linear gate, softmax, top-k; optional renormalisation of the chosen weights and jitter noise."""

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float | None = None,
        renormalize: bool = True,
        jitter: float = 0.0,
    ) -> None:
        super().__init__()
        check_moe(num_experts, top_k, capacity_factor)
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.renormalize, self.jitter = capacity_factor, renormalize, jitter
        self.gate = nn.Linear(n_embd, num_experts, bias=False)

    def forward(self, x: Tensor, seq_len: int) -> Routing:
        """Route ``x`` ``[N, C]`` whose rows are whole sequences of ``seq_len`` tokens, one after another."""
        if x.shape[0] % seq_len:
            raise ValueError(f"{x.shape[0]} tokens are not whole sequences of {seq_len}.")
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        weight = self.gate.weight
        weight = weight.to_local() if hasattr(weight, "to_local") else weight  # replicated over tp
        logits = F.linear(x, weight).float()
        probs = logits.softmax(dim=-1)
        top_p, expert_index = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.renormalize else top_p
        E, N, k = self.num_experts, x.shape[0], self.top_k
        S = N // seq_len
        # Load balancing (Switch Transformer), per sequence: fraction of assignments per expert x mean
        # probability, summed over sequences.
        routed = F.one_hot(expert_index, E).sum(dim=1).float().view(S, seq_len, E)
        fraction = routed.mean(dim=1) / k  # [S, E]
        mean_prob = probs.view(S, seq_len, E).mean(dim=1)
        aux_loss_sum = E * (fraction * mean_prob).sum()
        z_loss_sum = torch.logsumexp(logits, dim=-1).square().sum()
        keep = self._capacity_mask(expert_index, N, seq_len)
        load = torch.zeros(E, device=x.device).index_add_(
            0, expert_index[keep], torch.ones_like(expert_index[keep], dtype=torch.float32)
        )
        return Routing(expert_index, weights.to(x.dtype), keep, aux_loss_sum, z_loss_sum, load, S)

    def _capacity_mask(self, expert_index: Tensor, num_tokens: int, seq_len: int) -> Tensor:
        if self.capacity_factor is None:
            return torch.ones_like(expert_index, dtype=torch.bool)
        E, k = self.num_experts, self.top_k
        capacity = math.ceil(self.capacity_factor * seq_len * k / E)
        # Priority: every token's first choice before any second choice (GShard), in token order.
        S = num_tokens // seq_len
        order = expert_index.view(S, seq_len, k).transpose(1, 2).reshape(S, k * seq_len)  # [S, k*T]
        one_hot = F.one_hot(order, E)  # [S, k*T, E]
        position = (
            (one_hot.cumsum(dim=1) - 1).mul(one_hot).sum(dim=-1)
        )  # rank of each assignment in its expert
        return (position < capacity).view(S, k, seq_len).transpose(1, 2).reshape(num_tokens, k)


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


class _InjectAuxGrad(torch.autograd.Function):
    """Identity on ``out``; in backward, also gives ``aux`` the gradient ``scale`` (its loss weight).

    How a MoE layer on an early pipeline stage takes part in a loss computed on the last stage.
    """

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        ctx.aux_dtype = aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad, scale.to(ctx.aux_dtype).reshape(()), None


STAT_FIELDS = ("kept", "assigned", "aux_loss_sum", "z_loss_sum", "sequences", "tokens")
"""Per-layer routing statistics after the per-expert loads, in :meth:`MoE.pop_stats` vectors."""


class MoE(nn.Module):
    """A mixture-of-experts MLP: ``[T, B, C] -> [T, B, C]`` (sequence-first, like the GPT blocks).

    Args:
        n_embd: model width.
        num_experts: experts in the layer (``E``).
        make_expert: builds one expert (the dense MLP module of the model: one implementation for both).
        top_k: experts per token (1: Switch, 2: GShard / Mixtral).
        capacity_factor: assignments an expert takes per sequence, ``ceil(factor * T * k / E)``;
            ``None`` for dropless routing.
        aux_loss_coef: weight of the Switch load-balancing loss.
        z_loss_coef: weight of the router z-loss.
        renormalize: rescale a token's top-k weights to sum to 1.
        jitter: multiplicative uniform noise on the router input in training (0: off).
    """

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        make_expert: Callable[[], nn.Module],
        top_k: int = 2,
        capacity_factor: float | None = None,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        renormalize: bool = True,
        jitter: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = TopKRouter(n_embd, num_experts, top_k, capacity_factor, renormalize, jitter)
        self.experts = nn.ModuleDict({str(e): make_expert() for e in range(num_experts)})
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.group: dist.ProcessGroup | None = None
        self.sequence_parallel_group: dist.ProcessGroup | None = None
        """The tp group under sequence parallel (set by the strategy): inputs arrive as sequence shards."""
        self.aux_grad_scale: Tensor | None = None
        """Set by a pipeline runner while it trains: inject the aux gradient with this loss scale."""
        self.record = True
        """False while a pipeline stage infers shapes (a forward on placeholder data)."""
        self._pending_aux: list[Tensor] = []
        self._stats: Tensor | None = None

    def shard_experts(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        """Keep experts ``rank * E / size ...`` (this rank's block) and dispatch over ``group``."""
        check_moe(self.num_experts, self.router.top_k, self.router.capacity_factor, size)
        per_rank = self.num_experts // size
        mine = {str(e) for e in range(rank * per_rank, (rank + 1) * per_rank)}
        for key in list(self.experts.keys()):
            if key not in mine:
                del self.experts[key]
        self.group = group if size > 1 else None

    def _run_experts(self, x: Tensor, counts: list[int]) -> Tensor:
        parts = x.split(counts)
        outs = [
            self.experts[key](part) for key, part in zip(sorted(self.experts, key=int), parts, strict=True)
        ]
        return torch.cat(outs) if outs else x

    def forward(self, x: Tensor) -> Tensor:
        sp = self.sequence_parallel_group
        if sp is not None:  # routing groups are whole sequences: gather them, route, keep our shard
            x = _GatherSequence.apply(x, sp)
        T, B, C = x.shape
        flat = x.transpose(0, 1).reshape(B * T, C)  # whole sequences, one after another
        routing = self.router(flat, T)
        y = moe_forward(flat, routing, self._run_experts, self.num_experts, self.group)
        y = y.view(B, T, C).transpose(0, 1)
        if self.training and self.record:
            aux = self.aux_loss_coef * T * routing.aux_loss_sum + self.z_loss_coef * routing.z_loss_sum
            if torch.is_grad_enabled():
                if self.aux_grad_scale is not None:
                    y = _InjectAuxGrad.apply(y, aux, self.aux_grad_scale)
                    self._pending_aux.append(aux.detach())
                else:
                    self._pending_aux.append(aux)
            self._record(routing, T)
        return y if sp is None else _ScatterSequence.apply(y, sp)

    def _record(self, routing: Routing, seq_len: int) -> None:
        with torch.no_grad():
            extra = torch.stack(
                [
                    routing.keep.sum().float(),
                    torch.tensor(float(routing.keep.numel()), device=routing.keep.device),
                    routing.aux_loss_sum.detach().float(),
                    routing.z_loss_sum.detach().float(),
                    torch.tensor(float(routing.num_sequences), device=routing.keep.device),
                    torch.tensor(float(routing.num_sequences * seq_len), device=routing.keep.device),
                ]
            )
            row = torch.cat([routing.load, extra.to(routing.load.device)])
            self._stats = row if self._stats is None else self._stats + row

    def pop_aux(self) -> Tensor | None:
        """The weighted aux-loss sums of the forwards since the last call (with graph when not injected)."""
        if not self._pending_aux:
            return None
        total = torch.stack(self._pending_aux).sum()
        self._pending_aux = []
        return total

    def pop_stats(self) -> Tensor | None:
        """``[E + 6]``: per-expert kept load, then :data:`STAT_FIELDS`, summed since the last call."""
        stats, self._stats = self._stats, None
        return stats
