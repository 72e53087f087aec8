"""Llama, Mistral (without sliding window) and Mixtral as a LightningModule that any layout can shard.

Everything a causal LM does on the strategy (steps, loss through the pipeline runner, predict, generate,
MoE statistics) is :class:`lightning_par.models.causal_lm.CausalLM`, shared with GPT; this module holds
what is Llama's own: its shape, which tensor-parallel layouts it can take, its blocks' plan, its FLOPs and
its Hugging Face conversion (:mod:`lightning_par.models.hf_llama`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_par.models.causal_lm import CausalLM
from lightning_par.models.llama_layers import GroupedKV, check_kv_heads
from lightning_par.models.llama_network import LlamaConfig, LlamaNetwork
from torch import Tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.tensor_parallel.styles import ColumnParallel, Replicated, RowParallel


class Llama(CausalLM):
    """Llama causal LM; with ``num_experts`` it is Mixtral. Batches as :class:`~lightning_par.models.GPT`'s.

    RMSNorm, rotary positions (rotate-half, ``rope_theta``), SwiGLU MLP, grouped-query attention and no
    biases, computing what Hugging Face's ``LlamaForCausalLM`` / ``MixtralForCausalLM`` compute.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        n_layer: int = 4,
        n_head: int = 4,
        n_kv_head: int = 2,
        n_embd: int = 256,
        intermediate_size: int = 688,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 256,
        tie_word_embeddings: bool = False,
        pad_vocab_size_multiple: int = 64,
        pad_intermediate_size_multiple: int = 16,
        num_experts: int | None = None,
        moe_top_k: int = 2,
        moe_aux_loss_coef: float = 0.001,
        learning_rate: float = 3e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        lr_decay_steps: int | None = None,
        init_seed: int | None = None,
        hf_checkpoint: str | None = None,
    ) -> None:
        """
        Args:
            n_kv_head: key/value heads, shared by ``n_head / n_kv_head`` query heads each (it must divide
                ``n_head``; equal to it: multi-head attention). Under tp they are split when tp divides
                them, each replicated on ``tp / n_kv_head`` ranks when they divide tp.
            intermediate_size: width of the SwiGLU MLP (of each expert under Mixtral).
            pad_intermediate_size_multiple: the network's MLP width is ``intermediate_size`` zero-padded to
                a multiple of this, so that tensor parallel can split an odd width. Zero gate / up rows and
                down columns add exactly nothing, and their gradients are exactly zero, so they stay zero
                under AdamW (decay of zero is zero) and the model computes the unpadded one. The padding
                does not depend on the layout, so checkpoints reshard freely between layouts; Hugging Face
                loading pads and export cuts it off. 16 keeps common widths (688, 11008, 14336) unchanged.
            max_position_embeddings: the longest sequence (``block_size`` of the shared machinery).
            num_experts: experts in every layer's MLP (Mixtral: softmax router, top-``moe_top_k``
                renormalised, dropless); ``None``: dense Llama.
            moe_aux_loss_coef: weight of Mixtral's load-balancing loss, computed per sequence and layer
                and averaged over both (so it is the same on every layout; Hugging Face pools a whole
                batch and all layers, which agrees on one sequence and one layer).
            learning_rate, min_lr_ratio, weight_decay, betas, warmup_steps, lr_decay_steps, init_seed:
                as :class:`~lightning_par.models.GPT`'s.
            hf_checkpoint: a local Hugging Face Llama / Mistral / Mixtral directory to load instead of
                random weights (``Llama.from_hf(path)`` sets it and the shape).
        """
        super().__init__()
        self.save_hyperparameters()
        self.config = LlamaConfig(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            n_embd=n_embd,
            intermediate_size=intermediate_size,
            rope_theta=rope_theta,
            rms_norm_eps=rms_norm_eps,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=tie_word_embeddings,
            pad_vocab_size_multiple=pad_vocab_size_multiple,
            pad_intermediate_size_multiple=pad_intermediate_size_multiple,
            num_experts=num_experts,
            moe_top_k=moe_top_k,
            moe_aux_loss_coef=moe_aux_loss_coef,
        )
        self._setup_common(learning_rate, warmup_steps, init_seed)

    # ---- model protocol ---------------------------------------------------------------------------
    def _build_network(self, padded_vocab: int) -> LlamaNetwork:
        return LlamaNetwork(self.config, padded_vocab)

    def check_layout(self, tensor_parallel_size: int, sequence_parallel: bool) -> None:
        """Raise, before any weight exists, for a tp that cannot split the heads or the MLP."""
        cfg, tp = self.config, tensor_parallel_size
        valid = [
            d
            for d in range(1, cfg.n_head + 1)
            if cfg.n_head % d == 0
            and (cfg.n_kv_head % d == 0 or d % cfg.n_kv_head == 0)
            and cfg.padded_intermediate_size % d == 0
        ]
        hint = f" Valid tensor_parallel_size for this model: {valid}."
        if cfg.n_head % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide n_head={cfg.n_head} (the query heads are split "
                f"over tp).{hint}"
            )
        try:
            check_kv_heads(cfg.n_kv_head, tp)
        except ValueError as err:
            raise ValueError(f"{err}{hint}") from None
        if cfg.padded_intermediate_size % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide intermediate_size={cfg.intermediate_size} padded "
                f"to {cfg.padded_intermediate_size} (a multiple of pad_intermediate_size_multiple="
                f"{cfg.pad_intermediate_size_multiple}; the MLP's gate and up rows are split over tp).{hint}"
            )

    def block_plan(self, prefix: str, sequence_parallel: bool, moe: bool) -> dict[str, ParallelStyle]:
        kw = {"sequence_parallel": sequence_parallel}
        plan: dict[str, ParallelStyle] = {
            f"{prefix}.ln_1": Replicated(**kw),
            f"{prefix}.attn.q": ColumnParallel(**kw),
            f"{prefix}.attn.kv": GroupedKV(self.config.n_kv_head, **kw),
            f"{prefix}.attn.proj": RowParallel(**kw),
            f"{prefix}.ln_2": Replicated(**kw),
        }
        if moe:
            # Each expert is split like the dense MLP; experts see whole sequences (the MoE layer gathers
            # them under sequence parallel); the router stays whole on every tp rank.
            for name, style in (("gate", ColumnParallel), ("up", ColumnParallel), ("proj", RowParallel)):
                plan[f"{prefix}.mlp.experts.*.{name}"] = style()
        else:
            for name, style in (("gate", ColumnParallel), ("up", ColumnParallel), ("proj", RowParallel)):
                plan[f"{prefix}.mlp.{name}"] = style(**kw)
        return plan

    def matmul_params_per_token(self) -> int:
        """q and output projections ``2 C^2``, keys and values ``2 C n_kv_head head_dim``, SwiGLU ``3 C I``
        (per active expert, plus the router ``C E``), and the head.

        ``I`` is the real ``intermediate_size``: the padded MLP units multiply zeros, no useful work."""
        c = self.config
        attention = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * c.head_dim
        mlp = 3 * c.n_embd * c.intermediate_size
        if c.num_experts:
            mlp = c.moe_top_k * mlp + c.n_embd * c.num_experts
        return c.n_layer * (attention + mlp) + c.vocab_size * c.n_embd

    # ---- Hugging Face -------------------------------------------------------------------------------
    @staticmethod
    def hf_config_kwargs(path: str) -> dict[str, Any]:
        """``Llama`` kwargs from a local Llama / Mistral / Mixtral directory (``Llama.from_hf(path)``)."""
        from lightning_par.models.hf_llama import llama_config_kwargs

        return llama_config_kwargs(path)

    def hf_weight_source(self, path: str) -> Callable[..., Tensor]:
        from lightning_par.models.hf_llama import llama_weight_source

        assert self.model is not None
        return llama_weight_source(path, self.model)

    def export_hf(self, out_dir: str) -> Path:
        """Write a Hugging Face ``LlamaForCausalLM`` (``MixtralForCausalLM`` with experts) directory from
        this one-process model; sharded checkpoints: ``lightning-par export-hf``."""
        from lightning_par.models.hf_llama_export import export_llama

        return export_llama(self, out_dir)
