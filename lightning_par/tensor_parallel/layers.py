"""The layers a model is written with: plain ``nn`` layers in one process, sharded once a plan is applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.tensor_parallel.comm import TPInfo, local
from lightning_par.tensor_parallel.functions import (
    _ColumnParallelLinearFn,
    _ReduceFromTP,
    _RowParallelLinearFn,
    _VocabParallelCrossEntropy,
)


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
