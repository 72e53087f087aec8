"""GPT-2 causal language model as a LightningModule that any layout can shard.

The network follows the model protocol of ``lightning_par`` (see README, "Bring your own model"):

* ``configure_model`` builds the full-size network (on the meta device when the strategy asks);
* the network has ``embed`` (first pipeline stage), ``layers`` (``nn.ModuleDict`` keyed by global layer
  index), ``norm`` and ``head`` (last stage); ``forward`` skips the parts that are absent;
* ``tensor_parallel_plan`` gives the FQN -> style plan, ``init_weights`` fills materialised parameters
  identically on every layout (each parameter drawn from a generator seeded by the run seed and the
  parameter's name, then sharded), ``loss_fn`` computes a token-weighted loss on the last stage.

What GPT shares with the other causal LMs (steps, loss, predict, generate, the plan's skeleton) is
:class:`lightning_par.models.causal_lm.CausalLM`; this module holds what is GPT-2's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_par.models.blocks import block_tp_plan
from lightning_par.models.causal_lm import CausalLM, gather_vocab
from lightning_par.models.gpt_network import GPTConfig, GPTNetwork
from torch import Tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.tensor_parallel.styles import ColumnParallel, Replicated, RowParallel

__all__ = ["GPT", "GPTConfig", "GPTNetwork", "gather_vocab"]


class GPT(CausalLM):
    """GPT-2 causal LM. Batches: ``{"input_ids": [B, T], "labels": [B, T]}`` (labels aligned, -100 ignored).

    ``predict`` also takes batches without labels, or plain ``[B, T]`` tensors of token ids.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        block_size: int = 256,
        bias: bool = True,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        layer_norm_eps: float = 1e-5,
        pad_vocab_size_multiple: int = 64,
        num_experts: int = 0,
        moe_top_k: int = 2,
        moe_layer_freq: int = 2,
        moe_capacity_factor: float | None = None,
        moe_aux_loss_coef: float = 0.01,
        moe_z_loss_coef: float = 0.001,
        moe_jitter: float = 0.0,
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
            num_experts: experts per mixture-of-experts layer; 0 for a dense model.
            moe_top_k: experts each token is sent to (1: Switch, 2: GShard / Mixtral).
            moe_layer_freq: every ``moe_layer_freq``-th block has a MoE MLP (2: layers 1, 3, ...).
            moe_capacity_factor: expert capacity per sequence, ``ceil(factor * T * k / E)``; tokens over it
                are dropped (they keep their residual). ``None``: dropless.
            moe_aux_loss_coef: weight of the Switch load-balancing loss (per sequence, summed over layers).
            moe_z_loss_coef: weight of the router z-loss (per token, summed over layers).
            moe_jitter: multiplicative router-input noise in training (0: off; nonzero makes runs on
                different layouts draw different noise).
            learning_rate: peak AdamW learning rate, reached after ``warmup_steps``.
            min_lr_ratio: the cosine schedule decays to ``learning_rate * min_lr_ratio``.
            weight_decay: applied to matrices only (not to biases, LayerNorm or position embeddings).
            lr_decay_steps: length of the cosine decay; defaults to the trainer's total steps. A run
                without a finite step count (``max_steps=-1, max_epochs=-1``, bounded by ``max_time``) and
                without ``lr_decay_steps`` keeps ``learning_rate`` after warmup (with a warning).
            init_seed: seed of the weight initialisation; defaults to the global seed at construction
                (``L.seed_everything``), so every layout starts from the same weights.
            hf_checkpoint: a local Hugging Face GPT-2 directory to load instead of random weights.
        """
        super().__init__()
        self.save_hyperparameters()
        self.config = GPTConfig(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            block_size=block_size,
            bias=bias,
            dropout=dropout,
            tie_embeddings=tie_embeddings,
            layer_norm_eps=layer_norm_eps,
            pad_vocab_size_multiple=pad_vocab_size_multiple,
            num_experts=num_experts,
            moe_top_k=moe_top_k,
            moe_layer_freq=moe_layer_freq,
            moe_capacity_factor=moe_capacity_factor,
            moe_aux_loss_coef=moe_aux_loss_coef,
            moe_z_loss_coef=moe_z_loss_coef,
            moe_jitter=moe_jitter,
        )
        self._setup_common(learning_rate, warmup_steps, init_seed)

    # ---- model protocol ---------------------------------------------------------------------------
    def _build_network(self, padded_vocab: int) -> GPTNetwork:
        return GPTNetwork(self.config, padded_vocab)

    def check_layout(self, tensor_parallel_size: int, sequence_parallel: bool) -> None:
        """Raise before any work if this model cannot be split ``tensor_parallel_size`` ways."""
        cfg = self.config
        if cfg.n_head % tensor_parallel_size:
            valid = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size} does not divide n_head={cfg.n_head}; "
                f"valid tensor_parallel_size for this model: {valid}."
            )

    def tensor_parallel_plan(self, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        plan = super().tensor_parallel_plan(sequence_parallel)
        plan["model.embed.wpe"] = Replicated(sequence_parallel=sequence_parallel)
        return plan

    def block_plan(self, prefix: str, sequence_parallel: bool, moe: bool) -> dict[str, ParallelStyle]:
        layer = block_tp_plan(prefix, sequence_parallel)
        if moe:
            # Each expert is an MLP split like the dense one (the router stays whole on every tp rank).
            # Experts see whole sequences (the MoE layer gathers them under sequence parallel).
            layer = {k: v for k, v in layer.items() if ".mlp." not in k}
            layer[f"{prefix}.mlp.experts.*.fc"] = ColumnParallel()
            layer[f"{prefix}.mlp.experts.*.proj"] = RowParallel()
        return layer

    def matmul_params_per_token(self) -> int:
        c = self.config
        moe = len(c.moe_layers)
        mlp = 8 * c.n_embd * c.n_embd
        return (
            c.n_layer * 4 * c.n_embd * c.n_embd  # attention
            + (c.n_layer - moe) * mlp
            + moe * (c.moe_top_k * mlp + c.n_embd * c.num_experts)  # active experts and the router
            + c.vocab_size * c.n_embd
        )

    # ---- Hugging Face -------------------------------------------------------------------------------
    @staticmethod
    def hf_config_kwargs(path: str) -> dict[str, Any]:
        """``GPT`` kwargs from a local Hugging Face GPT-2 directory (``GPT.from_hf(path)``)."""
        from lightning_par.models.hf import gpt2_config_kwargs

        return gpt2_config_kwargs(path)

    def hf_weight_source(self, path: str) -> Callable[..., Tensor]:
        from lightning_par.models.hf import gpt2_weight_source

        assert self.model is not None
        return gpt2_weight_source(path, self.model)
