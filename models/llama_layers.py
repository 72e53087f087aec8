"""Llama's layers, for every layout: RMSNorm, rotary positions, grouped-query attention and SwiGLU.

Activations are sequence-first, ``[T, B, C]``, as in the GPT blocks. No layer has a bias.

**Grouped-query attention under tensor parallel.** Queries and key/values are two linears,
``attn.q`` (rows ``[query head, head_dim]``, Hugging Face's ``q_proj``) and ``attn.kv`` (rows
``[kv head, (k|v), head_dim]``: each kv head's key and value next to each other). Query head ``h`` uses
kv head ``h // (n_head / n_kv_head)`` (Hugging Face's ``repeat_kv``), so a row split of ``q`` over tp
gives rank ``r`` a run of whole query heads, and

* when tp divides ``n_kv_head``, a row split of ``kv`` gives the same rank exactly the kv heads those
  query heads use (:class:`GroupedKV` shards it, ``Shard(0)``);
* when ``n_kv_head`` divides tp, each kv head is shared by ``tp / n_kv_head`` ranks: ``kv`` is then whole
  on every rank (``Replicate()``, as Megatron replicates kv heads) and each rank multiplies only the rows
  of its kv head. The weight's gradient is complete on every rank as for any replicated parameter: summed
  over tp in the backward (under sequence parallel left as a partial sum, which the strategy sums over
  tp like every replicated parameter's).

Both projections (and SwiGLU's gate and up) read the same input: :func:`column_linears` runs them as one
column-parallel step, with one all-gather (sequence parallel) and one backward reduction for all.
Parameter names and shapes are those of one process on every layout (checkpoints resume anywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

from lightning_par.tensor_parallel import comm
from lightning_par.tensor_parallel.comm import _autocast, local
from lightning_par.tensor_parallel.layers import ParallelLinear
from lightning_par.tensor_parallel.styles import TPStyle, _to_dtensor

Rows = tuple[int, int] | None
"""The rows of a local weight a rank multiplies (``None``: all of them)."""


class _RMSNormFn(torch.autograd.Function):
    """``w * (x / rms(x))`` in fp32, with a hand-written backward.

    Autograd through the composite ops saves the input and the normalized input and runs about ten
    passes over the activations in backward; this saves only the fp32 normalized input and its
    per-row ``rsqrt`` and runs five (about half the time on a CPU, where the norm is work tensor
    parallel does not split). The forward is Hugging Face's arithmetic, op for op.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        xhat = h * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()
            # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
            mean = torch.linalg.vecdot(g, xhat, dim=-1).unsqueeze(-1).div_(xhat.shape[-1])
            grad_x = torch.addcmul(g, xhat, mean, value=-1).mul_(rstd).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rows = tuple(range(grad.dim() - 1))
            grad_w = (grad * xhat.to(ctx.x_dtype)).sum(dim=rows).to(weight.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square norm as Hugging Face's ``LlamaRMSNorm`` computes it (in fp32, then the input's
    dtype); the weight is used through its local value when it is a replicated DTensor."""

    def __init__(self, n_embd: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, local(self.weight), self.eps)


def rotary(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``[T, head_dim]`` of positions ``0..T-1`` (Hugging Face's default rotary embedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = torch.arange(seq_len, device=device).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` by position, in the rotate-half convention (Hugging Face's)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class _SharedInputColumnFn(torch.autograd.Function):
    """Several column-parallel linears of one input: ``x W_i[rows_i]^T`` for each weight.

    Forward needs no communication (sequence parallel: one all-gather of the input for all). Backward
    sums the input gradient over tp once, asynchronously while the weight gradients compute. A weight
    with ``rows`` is replicated: its gradient is zero outside those rows and is summed over tp (left as
    a partial sum under sequence parallel, where the strategy sums replicated gradients).
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: Any, rows: Sequence[Rows], *weights: Tensor):  # type: ignore[override]
        x, *weights = _autocast(x, *weights)
        if info.sequence_parallel:
            x, _ = comm.all_gather_dim0(x, info.group)
        ctx.save_for_backward(x, *weights)
        ctx.info, ctx.rows = info, rows
        return tuple(F.linear(x, _rows(w, r)) for w, r in zip(weights, rows, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        info, rows = ctx.info, ctx.rows
        used = [_rows(w, r) for w, r in zip(weights, rows, strict=True)]
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = sum(g.reshape(-1, w.shape[0]).mm(w) for g, w in zip(grads, used, strict=True))
            grad_x = grad_x.view(*x.shape)
            if info.sequence_parallel:
                grad_x, work = comm.reduce_scatter_dim0(grad_x, info.group, async_op=True)
            else:
                work = comm.all_reduce(grad_x, info.group, async_op=True)
        # The weight gradients compute while the input gradient is being summed over tp.
        x2 = x.reshape(-1, x.shape[-1])
        grad_ws = []
        for i, (g, w, r) in enumerate(zip(grads, weights, rows, strict=True)):
            if not ctx.needs_input_grad[3 + i]:
                grad_ws.append(None)
                continue
            gw = g.reshape(-1, g.shape[-1]).t().mm(x2)
            if r is not None:
                full = w.new_zeros(w.shape)
                full[r[0] : r[1]] = gw
                if not info.sequence_parallel:
                    comm.all_reduce(full, info.group)
                gw = full
            grad_ws.append(gw)
        if work is not None:
            work.wait()
        return (grad_x, None, None, *grad_ws)


def _rows(weight: Tensor, rows: Rows) -> Tensor:
    return weight if rows is None else weight[rows[0] : rows[1]]


def column_linears(x: Tensor, linears: Sequence[ParallelLinear], rows: Sequence[Rows]) -> tuple[Tensor, ...]:
    """``x`` through bias-free linears that share it, as one column-parallel step under tp.

    Without tensor parallel these are plain matmuls. Under tp the first linear's role gives the group
    and sequence parallel; ``rows`` picks the rows of a replicated weight this rank multiplies.
    """
    info = linears[0].tp
    if info is None:
        return tuple(F.linear(x, layer.weight) for layer in linears)
    weights = [local(layer.weight) for layer in linears]
    return _SharedInputColumnFn.apply(x, info, tuple(rows), *weights)


class GroupedKV(TPStyle):
    """The ``kv`` projection of grouped-query attention: split by kv head when tp divides
    ``num_kv_heads`` (``Shard(0)``), else whole on every rank (``Replicate()``: each rank then uses the
    kv head its query heads share). Any other tp is refused, naming both numbers."""

    module_types = (ParallelLinear,)

    def __init__(self, num_kv_heads: int, sequence_parallel: bool = False, comm_chunks: int = 1) -> None:
        super().__init__(sequence_parallel, comm_chunks)
        self.num_kv_heads = num_kv_heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        tp, n_kv = device_mesh.size(), self.num_kv_heads
        check_kv_heads(n_kv, tp)
        placement = Shard(0) if n_kv % tp == 0 else Replicate()
        module.register_parameter("weight", _to_dtensor(module.weight, device_mesh, placement))
        self.kind = "column" if n_kv % tp == 0 else "replicated"
        module.tp = self._info(device_mesh)
        return module


def check_kv_heads(n_kv_head: int, tensor_parallel_size: int) -> None:
    """Raise unless tp splits the kv heads (tp divides them) or replicates them (they divide tp)."""
    tp = tensor_parallel_size
    if n_kv_head % tp and tp % n_kv_head:
        raise ValueError(
            f"n_kv_head={n_kv_head} and tensor_parallel_size={tp} do not fit: the key/value heads are split "
            f"over tp when tp divides n_kv_head, or each replicated on tp / n_kv_head ranks when n_kv_head "
            f"divides tp, and neither holds here."
        )


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_kv_head`` key/value heads shared by ``n_head`` query heads, rotary
    positions on queries and keys, no biases (``n_kv_head == n_head``: plain multi-head attention)."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, rope_theta: float) -> None:
        super().__init__()
        if n_embd % n_head or n_head % n_kv_head:
            raise ValueError(
                f"n_embd={n_embd}, n_head={n_head}, n_kv_head={n_kv_head}: n_head must divide n_embd and "
                f"n_kv_head must divide n_head."
            )
        self.head_dim = n_embd // n_head
        self.n_kv_head = n_kv_head
        self.rope_theta = rope_theta
        self.q = ParallelLinear(n_embd, n_embd, bias=False)
        self.kv = ParallelLinear(n_embd, 2 * n_kv_head * self.head_dim, bias=False)
        self.proj = ParallelLinear(n_embd, n_embd, bias=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return self.proj(self._heads(x))

    def forward_deferred(self, x: Tensor, pending: list, attn_mask: Tensor | None = None) -> Tensor:
        """Like ``forward`` up to the output projection, whose all-reduce is left in ``pending``."""
        return self.proj.forward_deferred(self._heads(x), pending)

    def finish(self, y: Tensor) -> Tensor:
        return y

    def _kv_rows(self) -> Rows:
        """Under tp with replicated kv heads: the rows of the kv head this rank's query heads use."""
        info = self.kv.tp
        if info is None or info.kind != "replicated":
            return None
        g = info.rank // (info.size // self.n_kv_head)
        return 2 * self.head_dim * g, 2 * self.head_dim * (g + 1)

    def _heads(self, x: Tensor) -> Tensor:
        q, kv = column_linears(x, (self.q, self.kv), (None, self._kv_rows()))
        T, B, D = q.shape[0], q.shape[1], self.head_dim
        q = q.view(T, B, -1, D).permute(1, 2, 0, 3)  # [B, H_local, T, D]
        kv = kv.view(T, B, -1, 2, D).permute(3, 1, 2, 0, 4)  # [2, B, kv_local, T, D]
        cos, sin = rotary(T, D, self.rope_theta, x.device)
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(kv[0], cos, sin), kv[1]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return y.permute(2, 0, 1, 3).reshape(T, B, q.shape[1] * D)


class SwiGLU(nn.Module):
    """``proj(silu(gate(x)) * up(x))``: Llama's MLP and Mixtral's expert (gate, up column-parallel; proj
    row-parallel)."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.gate = ParallelLinear(n_embd, hidden, bias=False)
        self.up = ParallelLinear(n_embd, hidden, bias=False)
        self.proj = ParallelLinear(hidden, n_embd, bias=False)

    def _hidden(self, x: Tensor) -> Tensor:
        gate, up = column_linears(x, (self.gate, self.up), (None, None))
        return F.silu(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self._hidden(x))

    def forward_deferred(self, x: Tensor, pending: list, attn_mask: Tensor | None = None) -> Tensor:
        """Like ``forward`` up to the down projection, whose all-reduce is left in ``pending``."""
        return self.proj.forward_deferred(self._hidden(x), pending)

    def finish(self, y: Tensor) -> Tensor:
        return y
