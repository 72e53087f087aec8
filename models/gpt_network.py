"""The GPT-2 network: config, embedding, blocks, head and loss; sequence-first ``[T, B, C]`` activations.

What the LightningModule :class:`lightning_par.models.gpt.GPT` builds in ``configure_model``; it follows
the pipeline network protocol (``embed``, ``layers``, ``norm``, ``head``, ``loss_fn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_par.models.blocks import MLP, Block
from lightning_par.models.lm_network import CausalLMNetwork, padded_vocab
from torch import Tensor, nn

from lightning_par.experts.layer import MoE
from lightning_par.experts.router import check_moe
from lightning_par.optim.gradients import local
from lightning_par.tensor_parallel.layers import LayerNorm, ParallelEmbedding, ParallelLinear


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 style model."""

    vocab_size: int = 4096
    """Number of real tokens (padded internally to ``pad_vocab_size_multiple``)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    """Maximum sequence length (learned position embeddings)."""
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 64
    """The vocabulary is padded to a multiple of this (and of tp); padded rows never change the loss."""
    num_experts: int = 0
    """Experts per MoE layer; 0 for a dense model."""
    moe_top_k: int = 2
    moe_layer_freq: int = 2
    """Every ``moe_layer_freq``-th block (layers ``freq - 1``, ``2 freq - 1``, ...) has a MoE MLP."""
    moe_capacity_factor: float | None = None
    """Assignments per expert and sequence: ``ceil(factor * T * k / E)``; None: dropless."""
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    moe_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: it must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(valid n_head: {[d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0][:12]}...)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not valid: it must be in [0, 1).")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts!r} is not valid: it must be 0 (dense) or >= 1.")
        if self.num_experts:
            check_moe(self.num_experts, self.moe_top_k, self.moe_capacity_factor)
            if not isinstance(self.moe_layer_freq, int) or not 1 <= self.moe_layer_freq <= self.n_layer:
                raise ValueError(
                    f"moe_layer_freq={self.moe_layer_freq!r} is not valid: it must be between 1 and "
                    f"n_layer={self.n_layer}."
                )
            for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_jitter"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name}={getattr(self, name)} is not valid: it must be >= 0.")

    @property
    def moe_layers(self) -> list[int]:
        """Global indices of the blocks whose MLP is a mixture of experts."""
        if not self.num_experts:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_layer_freq == 0]

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        return padded_vocab(self.vocab_size, self.pad_vocab_size_multiple, tensor_parallel_size)


class GPTEmbedding(nn.Module):
    """Token + learned position embeddings (first pipeline stage)."""

    def __init__(self, cfg: GPTConfig, padded_vocab: int) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(padded_vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        tokens = self.wte(input_ids.t())  # [T, B, C], or [T / tp, B, C] under sequence parallel
        info = self.wte.tp
        t_local = tokens.shape[0]
        start = info.rank * t_local if info is not None and info.sequence_parallel else 0
        pos = local(self.wpe.weight)[start : start + t_local]
        return self.drop(tokens + pos.unsqueeze(1))


class GPTNetwork(CausalLMNetwork):
    """The GPT-2 network; returns sequence-first logits ``[T, B, V_local]``."""

    def __init__(self, cfg: GPTConfig, padded_vocab: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = padded_vocab
        self.embed: GPTEmbedding | None = GPTEmbedding(cfg, padded_vocab)
        moe = set(cfg.moe_layers)
        self.layers = nn.ModuleDict(
            {
                str(i): Block(
                    cfg.n_embd,
                    cfg.n_head,
                    cfg.bias,
                    cfg.dropout,
                    True,
                    True,
                    cfg.layer_norm_eps,
                    mlp=self._moe(cfg) if i in moe else None,
                )
                for i in range(cfg.n_layer)
            }
        )
        self.norm: LayerNorm | None = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.head: ParallelLinear | None = ParallelLinear(cfg.n_embd, padded_vocab, bias=False)
        self.tie_weights()

    @staticmethod
    def _moe(cfg: GPTConfig) -> MoE:
        return MoE(
            cfg.n_embd,
            cfg.num_experts,
            lambda: MLP(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, cfg.dropout),
            top_k=cfg.moe_top_k,
            capacity_factor=cfg.moe_capacity_factor,
            aux_loss_coef=cfg.moe_aux_loss_coef,
            z_loss_coef=cfg.moe_z_loss_coef,
            jitter=cfg.moe_jitter,
        )

    # ---- initialisation: same numbers on every layout ---------------------------------------------
    def init_std(self, name: str) -> float | None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer); None: constant."""
        if name.endswith("bias"):
            return None
        if ".ln_" in name or name.startswith("norm"):
            return None
        if name.endswith("attn.proj.weight") or (".mlp." in name and name.endswith("proj.weight")):
            return 0.02 / math.sqrt(2 * self.cfg.n_layer)
        return 0.02
