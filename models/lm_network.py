"""The network half of the causal LMs (GPT, Llama / Mixtral): what their networks share.

The pipeline protocol's ``forward`` (which skips the parts a stage does not hold, and interleaves batch
chunks under ``tp_comm_chunks``), the shifted token loss, the MoE layers' auxiliary losses, the tie of
the head to the embedding, and the random initialisation that gives every layout the same numbers.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning_par.models.blocks import forward_interleaved
from torch import Tensor, nn

from lightning_par.experts.layer import MoE
from lightning_par.initialization import Shard, name_seed
from lightning_par.tensor_parallel.layers import vocab_parallel_cross_entropy


def padded_vocab(vocab_size: int, multiple: int, tensor_parallel_size: int = 1) -> int:
    """The vocabulary padded to a multiple of ``multiple`` and of tp (padded rows never change the loss)."""
    step = math.lcm(multiple, tensor_parallel_size)
    return -(-vocab_size // step) * step


class CausalLMNetwork(nn.Module, metaclass=ABCMeta):
    """The pipeline-protocol network of a causal LM: ``embed``, ``layers``, ``norm``, ``head``, ``loss_fn``.

    Subclasses build the four parts (``embed.wte`` the token embedding) and say how each parameter is
    initialised (:meth:`init_std`); returns sequence-first logits ``[T, B, V_local]``.
    """

    cfg: Any
    padded_vocab: int
    embed: nn.Module | None
    layers: nn.ModuleDict
    norm: nn.Module | None
    head: nn.Module | None

    def moe_modules(self) -> dict[int, MoE]:
        """This rank's MoE layers by global layer index."""
        return {int(i): b.mlp for i, b in self.layers.items() if isinstance(b.mlp, MoE)}

    def pop_aux_loss(self) -> Tensor | None:
        """The MoE layers' weighted aux-loss sums since the last call (added to the loss sum)."""
        terms = [t for m in self.moe_modules().values() if (t := m.pop_aux()) is not None]
        return torch.stack(terms).sum() if terms else None

    def tie_weights(self) -> None:
        """Share the token embedding with the output head (again after sharding: ``parallelize_module``
        replaces parameters, which unties them)."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.wte.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            if x.shape[1] > self.cfg.block_size:
                raise ValueError(
                    f"sequence length {x.shape[1]} exceeds block_size={self.cfg.block_size}; "
                    f"use sequences of at most {self.cfg.block_size} tokens."
                )
            x = self.embed(x)
        blocks = list(self.layers.values())
        chunks = self.overlap_chunks(x.shape[1])
        if chunks > 1:
            # Tensor parallel: split the batch so one chunk's all-reduces overlap the other's matmuls.
            parts = forward_interleaved(blocks, [c.contiguous() for c in x.chunk(chunks, dim=1)])
            x = torch.cat(parts, dim=1)
        else:
            for layer in blocks:
                x = layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def overlap_chunks(self, batch_size: int) -> int:
        """Batch chunks for communication overlap: the plan's ``comm_chunks`` under plain tensor parallel."""
        if not self.layers or self.cfg.num_experts:
            return 1  # (MoE layers have no deferred all-reduce to overlap)
        info = next(iter(self.layers.values())).tp_info()
        if info is None or info.sequence_parallel:
            return 1
        return max(1, min(info.comm_chunks, batch_size))

    def loss_fn(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Shifted next-token loss: ``(sum over counted tokens, number of counted tokens)``.

        ``logits`` are ``[T, B, V_local]``; ``labels`` are ``[B, T]`` aligned with the inputs (the model
        shifts), ``-100`` ignored. Padded vocabulary rows are masked out.
        """
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).t()  # [T, B]
        info = self.head.tp if self.head is not None else None
        if info is None:
            logits = logits[..., : self.cfg.vocab_size]
        return vocab_parallel_cross_entropy(logits, shifted, info)

    @staticmethod
    def count_loss_tokens(labels: Tensor) -> Tensor:
        """The number of tokens :meth:`loss_fn` counts (known before any stage runs: pipeline scaling)."""
        return (labels[:, 1:] != -100).sum()

    @abstractmethod
    def init_std(self, name: str) -> float | None:
        """The standard deviation of parameter ``name``'s normal init; ``None``: constant (1 for a norm's
        weight, 0 for a bias)."""

    def random_init_source(self, seed: int) -> Callable[..., Tensor]:
        """Every rank draws the whole tensor (so the numbers do not depend on the layout); the caller slices."""

        def source(name: str, shape: torch.Size, shard: Shard | None = None) -> Tensor:
            if name == "head.weight" and self.cfg.tie_embeddings:
                name = "embed.wte.weight"  # a pipeline rank holding only the head: same numbers as the tie
            std = self.init_std(name)
            if std is None:
                fill = 1.0 if name.endswith("weight") else 0.0
                return torch.full(shape, fill)
            gen = torch.Generator().manual_seed(name_seed(seed, name))
            full = torch.empty(shape).normal_(0.0, std, generator=gen)
            if name in ("embed.wte.weight", "head.weight"):
                full[self.cfg.vocab_size :] = 0.0  # padded vocabulary rows
            return full

        return source
