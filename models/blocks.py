"""Transformer building blocks shared by GPT and BERT (and the block structure Llama's blocks follow).

Activations are sequence-first, ``[T, B, C]``. The linear layers are
:class:`lightning_par.tensor_parallel.ParallelLinear`: plain ``nn.Linear`` in one process, column- or
row-parallel once a tensor-parallel plan is applied. Nothing here knows about process groups; the number
of heads a rank holds is read off the shape of its q/k/v projection.

The q/k/v projection is one fused linear whose output rows are ordered head by head
(``[head, (q|k|v), head_dim]``), so splitting the rows over tp gives each rank whole heads with their
q, k and v: one matmul and one backward all-reduce per attention instead of three.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.tensor_parallel.comm import TPInfo
from lightning_par.tensor_parallel.layers import LayerNorm, ParallelLinear


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal (GPT) or bidirectional with a padding mask (BERT)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float, causal: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}.")
        self.head_dim = n_embd // n_head
        self.causal = causal
        self.dropout = dropout
        self.qkv = ParallelLinear(n_embd, 3 * n_embd, bias=bias)
        self.proj = ParallelLinear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return self.resid_dropout(self.proj(self._heads(x, attn_mask)))

    def forward_deferred(self, x: Tensor, pending: list, attn_mask: Tensor | None = None) -> Tensor:
        """Like ``forward`` up to the output projection, whose all-reduce is left in ``pending``."""
        return self.proj.forward_deferred(self._heads(x, attn_mask), pending)

    def finish(self, y: Tensor) -> Tensor:
        """Complete :meth:`forward_deferred` once ``pending`` has been waited on."""
        return self.resid_dropout(self.proj.add_bias(y))

    def _heads(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        qkv = self.qkv(x)  # [T, B, 3 * local_heads * head_dim]
        T, B = qkv.shape[0], qkv.shape[1]
        heads = qkv.shape[-1] // (3 * self.head_dim)
        # [T, B, H, 3, D] -> three [B, H, T, D]
        qkv = qkv.view(T, B, heads, 3, self.head_dim).permute(3, 1, 2, 0, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None,
        )
        return y.permute(2, 0, 1, 3).reshape(T, B, heads * self.head_dim)


class MLP(nn.Module):
    """Two linears with GELU (tanh approximation, as GPT-2 and BERT use)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool, dropout: float, gelu: str = "tanh") -> None:
        super().__init__()
        self.fc = ParallelLinear(n_embd, hidden, bias=bias)
        self.proj = ParallelLinear(hidden, n_embd, bias=bias)
        self.gelu = gelu
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.gelu)))

    def forward_deferred(self, x: Tensor, pending: list, attn_mask: Tensor | None = None) -> Tensor:
        """Like ``forward`` up to the second linear, whose all-reduce is left in ``pending``."""
        return self.proj.forward_deferred(F.gelu(self.fc(x), approximate=self.gelu), pending)

    def finish(self, y: Tensor) -> Tensor:
        return self.dropout(self.proj.add_bias(y))


class ResidualBlock(nn.Module):
    """Two residual halves, attention then MLP, each behind its norm: what every layout relies on.

    Subclasses build ``ln_1``, ``attn``, ``ln_2`` and ``mlp`` (and set ``pre_norm``); the pipeline split
    (:data:`PARTS`), activation recomputation and :func:`forward_interleaved` see only these four names. A
    pipeline stage may hold one half of a block: the other half's modules are then None and ``forward``
    skips them.
    """

    PARTS = {"attn": ("ln_1", "attn"), "mlp": ("ln_2", "mlp")}
    """The block's halves in forward order, each with its submodules (where pipeline stages may cut)."""

    pre_norm = True
    ln_1: nn.Module | None
    attn: nn.Module | None
    ln_2: nn.Module | None
    mlp: nn.Module | None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if self.attn is not None:
            if self.pre_norm:
                x = x + self.attn(self.ln_1(x), attn_mask)
            else:
                x = self.ln_1(x + self.attn(x, attn_mask))
        if self.mlp is not None:
            if self.pre_norm:
                x = x + self.mlp(self.ln_2(x))
            else:
                x = self.ln_2(x + self.mlp(x))
        return x

    def tp_info(self) -> TPInfo | None:
        """How tensor parallel splits this block (``None``: not split), read off whichever half it holds."""
        for half in (self.attn, self.mlp):
            proj = getattr(half, "proj", None)
            if proj is not None:
                return proj.tp
        return None


class Block(ResidualBlock):
    """A GPT / BERT block; ``pre_norm=True`` is GPT-2's layout, ``False`` the original (BERT) one."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        bias: bool = True,
        dropout: float = 0.0,
        causal: bool = True,
        pre_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        mlp_hidden: int | None = None,
        gelu: str = "tanh",
        mlp: nn.Module | None = None,
    ) -> None:
        """``mlp`` replaces the dense MLP (a :class:`lightning_par.experts.MoE` layer)."""
        super().__init__()
        self.pre_norm = pre_norm
        self.ln_1 = LayerNorm(n_embd, eps=layer_norm_eps, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, bias, dropout, causal)
        self.ln_2 = LayerNorm(n_embd, eps=layer_norm_eps, bias=bias)
        self.mlp = mlp if mlp is not None else MLP(n_embd, mlp_hidden or 4 * n_embd, bias, dropout, gelu)


def forward_interleaved(blocks: list[ResidualBlock], chunks: list[Tensor]) -> list[Tensor]:
    """Run pre-norm blocks on several chunks of the batch, overlapping communication with compute.

    The blocks are taken half by half (attention, MLP). Each chunk's row-parallel all-reduce is left in
    flight while the other chunks compute the same half, and is waited on only when that chunk goes on
    to its next half. With two chunks every all-reduce but the last overlaps a matmul of the other
    chunk. Each token sees exactly the operations of ``ResidualBlock.forward`` (no attention mask: causal).
    """
    if any(not b.pre_norm for b in blocks):
        raise ValueError("forward_interleaved supports pre-norm blocks only.")
    xs = list(chunks)
    in_flight: list[tuple[Tensor, list, nn.Module] | None] = [None] * len(xs)
    halves = [(h, norm) for b in blocks for h, norm in ((b.attn, b.ln_1), (b.mlp, b.ln_2)) if h is not None]
    for half, norm in [*halves, (None, None)]:
        for i in range(len(xs)):
            if in_flight[i] is not None:
                y, pending, prev = in_flight[i]
                for work in pending:
                    work.wait()
                xs[i] = xs[i] + prev.finish(y)
                in_flight[i] = None
            if half is not None:
                pending: list = []
                in_flight[i] = (half.forward_deferred(norm(xs[i]), pending), pending, half)
    return xs


def block_tp_plan(prefix: str, sequence_parallel: bool) -> dict:
    """The tensor-parallel plan of :class:`Block`, for layers under ``prefix`` (e.g. ``"layers.*"``)."""
    from lightning_par.tensor_parallel.styles import ColumnParallel, Replicated, RowParallel

    kw = {"sequence_parallel": sequence_parallel}
    return {
        f"{prefix}.ln_1": Replicated(**kw),
        f"{prefix}.attn.qkv": ColumnParallel(**kw),
        f"{prefix}.attn.proj": RowParallel(**kw),
        f"{prefix}.ln_2": Replicated(**kw),
        f"{prefix}.mlp.fc": ColumnParallel(**kw),
        f"{prefix}.mlp.proj": RowParallel(**kw),
    }
