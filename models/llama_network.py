"""The Llama / Mixtral network: config, embedding, blocks, head; sequence-first ``[T, B, C]`` activations.

What :class:`lightning_par.models.llama.Llama` builds in ``configure_model``. It follows the pipeline
network protocol (``embed``, ``layers``, ``norm``, ``head``, ``loss_fn``, from
:class:`~lightning_par.models.lm_network.CausalLMNetwork`) and its blocks have GPT's two halves
(:class:`~lightning_par.models.blocks.ResidualBlock`), so pipeline stages may cut between attention and
MLP. With ``num_experts`` every block's MLP is a :class:`lightning_par.experts.MoE` of SwiGLU experts:
Mixtral.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from lightning_par.models.blocks import ResidualBlock
from lightning_par.models.llama_layers import GroupedQueryAttention, RMSNorm, SwiGLU
from lightning_par.models.lm_network import CausalLMNetwork, padded_vocab
from torch import Size, Tensor, nn

from lightning_par.experts.layer import MoE
from lightning_par.experts.router import check_moe
from lightning_par.initialization import Shard
from lightning_par.tensor_parallel.layers import ParallelEmbedding, ParallelLinear


@dataclass
class LlamaConfig:
    """Shape of a Llama (``num_experts=None``) or Mixtral model."""

    vocab_size: int = 4096
    """Number of real tokens (padded internally to ``pad_vocab_size_multiple`` and tp)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    """Key/value heads (grouped-query attention); it divides ``n_head``; ``n_head``: plain MHA."""
    n_embd: int = 256
    intermediate_size: int = 688
    """Width of the SwiGLU MLP (of each expert under Mixtral); the network's: ``padded_intermediate_size``."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 256
    """Longest sequence the model takes."""
    tie_word_embeddings: bool = False
    pad_vocab_size_multiple: int = 64
    pad_intermediate_size_multiple: int = 16
    """The MLP width is zero-padded to a multiple of this so that tensor parallel can split it (zero gate,
    up and down weights compute and learn nothing: the model is the unpadded one). It does not depend on
    the layout, so checkpoints reshard freely; 16 keeps common widths (688, 11008, 14336) as they are."""
    num_experts: int | None = None
    """Experts in every layer's MLP (Mixtral); ``None``: dense (Llama)."""
    moe_top_k: int = 2
    moe_aux_loss_coef: float = 0.001
    """Weight of Mixtral's load-balancing loss (Hugging Face's ``router_aux_loss_coef``)."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
        for name in (*positive, "pad_intermediate_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: it must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"head_dim = n_embd / n_head = {self.n_embd // self.n_head} must be even (rotary positions "
                "rotate pairs of dimensions)."
            )
        if self.n_head % self.n_kv_head:
            valid = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}: every kv head serves "
                f"the same number of query heads; valid n_kv_head: {valid}."
            )
        if self.num_experts == 0:
            self.num_experts = None  # (GPT's spelling of a dense model)
        if self.num_experts is not None:
            check_moe(self.num_experts, self.moe_top_k, None)
            if self.moe_aux_loss_coef < 0:
                raise ValueError(f"moe_aux_loss_coef={self.moe_aux_loss_coef} is not valid: it must be >= 0.")

    @property
    def block_size(self) -> int:
        return self.max_position_embeddings

    @property
    def tie_embeddings(self) -> bool:
        return self.tie_word_embeddings

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def moe_layers(self) -> list[int]:
        """Global indices of the blocks whose MLP is a mixture of experts: all of them under Mixtral."""
        return list(range(self.n_layer)) if self.num_experts else []

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        return padded_vocab(self.vocab_size, self.pad_vocab_size_multiple, tensor_parallel_size)

    @property
    def padded_intermediate_size(self) -> int:
        """The network's MLP width: ``intermediate_size`` rounded up to ``pad_intermediate_size_multiple``
        (the same on every layout; the extra units' weights are zero)."""
        step = self.pad_intermediate_size_multiple
        return -(-self.intermediate_size // step) * step


def mlp_width_dim(name: str) -> int | None:
    """The dimension of parameter ``name`` (the network's name) that is the MLP width, padded with zeros:
    0 for the rows of a SwiGLU's ``gate`` and ``up`` (dense or an expert's), 1 for the columns of its
    ``proj``; ``None`` for every other parameter (the router's ``gate`` included)."""
    parts = name.split(".")
    if parts[0] != "layers" or parts[-1] != "weight" or len(parts) < 3 or parts[2] != "mlp":
        return None
    if len(parts) == 5:
        linear = parts[3]  # layers.{i}.mlp.{gate,up,proj}.weight
    elif len(parts) == 7 and parts[3] == "experts":
        linear = parts[5]  # layers.{i}.mlp.experts.{e}.{gate,up,proj}.weight
    else:
        return None
    return {"gate": 0, "up": 0, "proj": 1}.get(linear)


def pad_mlp_width(tensor: Tensor, dim: int, width: int) -> Tensor:
    """``tensor`` with zeros appended along ``dim`` (0 or 1 of a matrix) up to ``width``."""
    extra = width - tensor.shape[dim]
    return F.pad(tensor, (0, extra) if dim == 1 else (0, 0, 0, extra)) if extra else tensor


class LlamaEmbedding(nn.Module):
    """Token embedding only (positions are rotary, inside attention)."""

    def __init__(self, padded_vocab: int, n_embd: int) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(padded_vocab, n_embd)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids.t())  # [T, B, C], or [T / tp, B, C] under sequence parallel


class LlamaBlock(ResidualBlock):
    """Pre-norm block: RMSNorm, grouped-query attention, RMSNorm, SwiGLU (or a MoE of SwiGLU experts)."""

    def __init__(self, cfg: LlamaConfig, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.attn = GroupedQueryAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.rope_theta)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else SwiGLU(cfg.n_embd, cfg.padded_intermediate_size)


class LlamaNetwork(CausalLMNetwork):
    """The Llama / Mixtral network; returns sequence-first logits ``[T, B, V_local]``."""

    def __init__(self, cfg: LlamaConfig, padded_vocab: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = padded_vocab
        self.embed: LlamaEmbedding | None = LlamaEmbedding(padded_vocab, cfg.n_embd)
        moe = set(cfg.moe_layers)
        self.layers = nn.ModuleDict(
            {str(i): LlamaBlock(cfg, self._moe(cfg) if i in moe else None) for i in range(cfg.n_layer)}
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.head: ParallelLinear | None = ParallelLinear(cfg.n_embd, padded_vocab, bias=False)
        self.tie_weights()

    @staticmethod
    def _moe(cfg: LlamaConfig) -> MoE:
        """Mixtral's sparse MLP: softmax router, top-k renormalised, dropless, SwiGLU experts.

        Its load-balancing loss is Mixtral's ``E * sum_e f_e * P_e`` (``f_e``: the fraction of tokens
        choosing expert ``e``, each of the k choices counted; ``P_e``: its mean router probability), which
        is ``top_k`` times the Switch form the router computes; per sequence and layer, and averaged over
        both (hence ``coef * top_k / n_layer``), so it is the same on every layout.
        """
        assert cfg.num_experts is not None
        return MoE(
            cfg.n_embd,
            cfg.num_experts,
            lambda: SwiGLU(cfg.n_embd, cfg.padded_intermediate_size),
            top_k=cfg.moe_top_k,
            capacity_factor=None,
            aux_loss_coef=cfg.moe_aux_loss_coef * cfg.moe_top_k / cfg.n_layer,
            z_loss_coef=0.0,
            renormalize=True,
        )

    def init_std(self, name: str) -> float | None:
        """Hugging Face's Llama init: N(0, 0.02) for every matrix, norms at 1."""
        if ".ln_" in name or name.startswith("norm"):
            return None
        return 0.02

    def random_init_source(self, seed: int) -> Callable[..., Tensor]:
        """The shared seeded init, with the MLP drawn at its real width and zero-padded: the pads start at
        zero (and stay there: their gradients are exactly zero), and the real weights are those of an
        unpadded model with the same seed."""
        draw = super().random_init_source(seed)
        real, padded = self.cfg.intermediate_size, self.cfg.padded_intermediate_size

        def source(name: str, shape: Size, shard: Shard | None = None) -> Tensor:
            dim = mlp_width_dim(name)
            if dim is None or shape[dim] != padded:
                return draw(name, shape, shard)
            unpadded = list(shape)
            unpadded[dim] = real
            return pad_mlp_width(draw(name, Size(unpadded), None), dim, padded)

        return source
