"""The mixture-of-experts layer: router, this rank's block of experts, dispatch and statistics."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_par.experts.dispatch import _GatherSequence, _ScatterSequence, moe_forward
from lightning_par.experts.router import Routing, TopKRouter, check_moe
from lightning_par.memory.recompute import forward_value, recomputing


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
        # A recomputed block runs this again in backward: the same ops (the settings of its forward, which
        # a pipeline runner changes outside forward calls), but the statistics and losses only once.
        record, scale = forward_value((self.training and self.record, self.aux_grad_scale))
        if record:
            aux = self.aux_loss_coef * T * routing.aux_loss_sum + self.z_loss_coef * routing.z_loss_sum
            grad = torch.is_grad_enabled()
            if grad and scale is not None:
                y = _InjectAuxGrad.apply(y, aux, scale)
            if not recomputing():
                if grad:
                    self._pending_aux.append(aux if scale is None else aux.detach())
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
