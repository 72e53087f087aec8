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

from lightning_par.tensor_parallel.comm import TPInfo, all_gather_dim0, all_reduce, local, reduce_scatter_dim0
from lightning_par.tensor_parallel.layers import (
    LayerNorm,
    ParallelEmbedding,
    ParallelLinear,
    vocab_parallel_cross_entropy,
)
from lightning_par.tensor_parallel.styles import (
    ColumnParallel,
    Replicated,
    RowParallel,
    TPStyle,
    VocabParallel,
)

__all__ = [
    "ColumnParallel",
    "LayerNorm",
    "ParallelEmbedding",
    "ParallelLinear",
    "Replicated",
    "RowParallel",
    "TPInfo",
    "TPStyle",
    "VocabParallel",
    "all_gather_dim0",
    "all_reduce",
    "local",
    "reduce_scatter_dim0",
    "vocab_parallel_cross_entropy",
]
