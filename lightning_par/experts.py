"""Mixture of experts: a top-k router (load-balancing and z losses, capacity) and expert-parallel dispatch.

Where this sits: the building blocks of issue 5 (MoE GPT, ``strategy="ep"``). A MoE layer routes each
token to ``top_k`` of ``num_experts`` expert MLPs; under expert parallelism each rank of the ep group
holds ``num_experts / ep`` of them, and tokens travel to their experts and back with one
``all_to_all_single`` each way (uneven split sizes, differentiable through
``torch.distributed.nn.functional``). Nothing loops over tokens; the loop over a rank's own experts is a
handful of matmuls.

Capacity is counted per sequence (each sequence is a routing group): which tokens are dropped then does not
depend on how sequences are spread over ranks, so every layout drops the same tokens as one process.
Dropped assignments contribute nothing; the token keeps its residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Where each token goes. ``N`` tokens, ``k`` choices each."""

    expert_index: Tensor  # [N, k] int64, global expert indices
    weights: Tensor  # [N, k] the router weights the expert outputs are combined with
    keep: Tensor  # [N, k] bool: False where the expert was over capacity (the assignment is dropped)
    aux_loss: Tensor  # Switch load-balancing loss: E * sum_e fraction_e * mean_probability_e
    z_loss: Tensor  # mean over tokens of logsumexp(logits)^2
    load: Tensor  # [E] kept assignments per expert

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
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.gate.weight).float()
        probs = logits.softmax(dim=-1)
        top_p, expert_index = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True) if self.renormalize else top_p
        E, N, k = self.num_experts, x.shape[0], self.top_k
        # Load balancing (Switch Transformer): fraction of assignments per expert x mean probability.
        routed = F.one_hot(expert_index, E).sum(dim=1).float()  # [N, E]
        fraction = routed.mean(dim=0) / k
        aux_loss = E * (fraction * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        keep = self._capacity_mask(expert_index, N, seq_len)
        load = torch.zeros(E, device=x.device).index_add_(
            0, expert_index[keep], torch.ones_like(expert_index[keep], dtype=torch.float32)
        )
        return Routing(expert_index, weights.to(x.dtype), keep, aux_loss, z_loss, load)

    def _capacity_mask(self, expert_index: Tensor, num_tokens: int, seq_len: int) -> Tensor:
        if self.capacity_factor is None:
            return torch.ones_like(expert_index, dtype=torch.bool)
        if num_tokens % seq_len:
            raise ValueError(f"{num_tokens} tokens are not whole sequences of {seq_len}.")
        E, k = self.num_experts, self.top_k
        capacity = math.ceil(self.capacity_factor * seq_len * k / E)
        # Priority: every token's first choice before any second choice (GShard), in token order.
        S = num_tokens // seq_len
        order = expert_index.view(S, seq_len, k).transpose(1, 2).reshape(S, k * seq_len)  # [S, k*T]
        one_hot = F.one_hot(order, E)  # [S, k*T, E]
        position = (
            (one_hot.cumsum(dim=1) - 1).mul(one_hot).sum(dim=-1)
        )  # rank of each assignment in its expert
        keep = (position < capacity).view(S, k, seq_len).transpose(1, 2).reshape(num_tokens, k)
        return keep


class GroupedExperts(nn.Module):
    """``num_local_experts`` GELU MLPs (the GPT MLP's shape), stored as stacked weights.

    Parameter names carry nothing layout-specific; the strategy records which global experts a rank holds
    (``expert_offset``) so checkpoints use global indices.
    """

    def __init__(self, num_local_experts: int, n_embd: int, hidden: int, expert_offset: int = 0) -> None:
        super().__init__()
        self.expert_offset = expert_offset
        self.fc_weight = nn.Parameter(torch.empty(num_local_experts, hidden, n_embd))
        self.fc_bias = nn.Parameter(torch.zeros(num_local_experts, hidden))
        self.proj_weight = nn.Parameter(torch.empty(num_local_experts, n_embd, hidden))
        self.proj_bias = nn.Parameter(torch.zeros(num_local_experts, n_embd))

    @property
    def num_local_experts(self) -> int:
        return self.fc_weight.shape[0]

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """``x`` holds ``counts[e]`` tokens for local expert ``e``, one expert after another."""
        outs = []
        for e, part in enumerate(x.split(counts)):
            h = F.gelu(F.linear(part, self.fc_weight[e], self.fc_bias[e]), approximate="tanh")
            outs.append(F.linear(h, self.proj_weight[e], self.proj_bias[e]))
        return torch.cat(outs) if outs else x


def moe_forward(
    x: Tensor, routing: Routing, experts: GroupedExperts, num_experts: int, group: dist.ProcessGroup | None
) -> Tensor:
    """Send each kept assignment to its expert (all-to-all over ``group``), run the experts, combine.

    ``x`` is ``[N, C]``; returns ``[N, C]``: sum over a token's kept choices of weight x expert(token).
    """
    N, k = routing.expert_index.shape
    ep = 1 if group is None else dist.get_world_size(group)
    e_local = num_experts // ep
    flat_expert = routing.expert_index.reshape(-1)
    flat_keep = routing.keep.reshape(-1)
    token = torch.arange(N, device=x.device).repeat_interleave(k)
    assignment = flat_keep.nonzero().squeeze(-1)
    expert = flat_expert[assignment]
    order = torch.argsort(expert, stable=True)  # expert-major: rank-major too, experts being in rank blocks
    assignment, expert = assignment[order], expert[order]
    send = x[token[assignment]]
    per_expert = torch.bincount(expert, minlength=num_experts)  # [E] tokens this rank sends to each expert

    if ep == 1:
        y = experts(send, per_expert.tolist())
    else:
        from torch.distributed.nn.functional import all_to_all_single

        # Counts first: recv[r, e] tokens arrive from rank r for local expert e.
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=group)
        recv = recv_counts.view(ep, e_local)
        send_splits = per_expert.view(ep, e_local).sum(dim=1).tolist()
        recv_splits = recv.sum(dim=1).tolist()
        received = all_to_all_single(
            x.new_empty((sum(recv_splits), x.shape[1])), send, recv_splits, send_splits, group=group
        )
        # Received rows are grouped by source rank, then by expert: regroup by expert for the matmuls.
        src_expert = torch.arange(e_local, device=x.device).repeat(ep).repeat_interleave(recv.reshape(-1))
        regroup = torch.argsort(src_expert, stable=True)
        out = experts(received[regroup], recv.sum(dim=0).tolist())
        back = torch.empty_like(out).index_copy(0, regroup, out)  # undo the regrouping (differentiable)
        y = all_to_all_single(
            x.new_empty((send.shape[0], x.shape[1])), back, send_splits, recv_splits, group=group
        )

    weight = routing.weights.reshape(-1)[assignment].unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, token[assignment], y * weight)
