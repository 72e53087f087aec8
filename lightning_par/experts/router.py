"""The top-k router: routing decisions, capacity, load-balancing and z losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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
