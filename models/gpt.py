"""GPT-2 causal language model as a LightningModule that any layout can shard.

The network follows the model protocol of ``lightning_par`` (see README, "Bring your own model"):

* ``configure_model`` builds the full-size network (on the meta device when the strategy asks);
* the network has ``embed`` (first pipeline stage), ``layers`` (``nn.ModuleDict`` keyed by global layer
  index), ``norm`` and ``head`` (last stage); ``forward`` skips the parts that are absent;
* ``tensor_parallel_plan`` gives the FQN -> style plan, ``init_weights`` fills materialised parameters
  identically on every layout (each parameter drawn from a generator seeded by the run seed and the
  parameter's name, then sharded), ``loss_fn`` computes a token-weighted loss on the last stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning_par.models.base import ParallelModule
from lightning_par.models.blocks import MLP, Block, block_tp_plan, forward_interleaved
from lightning_par.models.metrics import TokenMeanLoss
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.experts.layer import STAT_FIELDS, MoE
from lightning_par.experts.router import check_moe
from lightning_par.initialization import Shard, fill_parameters, name_seed
from lightning_par.optim.gradients import local
from lightning_par.tensor_parallel.layers import (
    LayerNorm,
    ParallelEmbedding,
    ParallelLinear,
    vocab_parallel_cross_entropy,
)
from lightning_par.tensor_parallel.styles import ColumnParallel, Replicated, RowParallel, VocabParallel


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
        multiple = math.lcm(self.pad_vocab_size_multiple, tensor_parallel_size)
        return -(-self.vocab_size // multiple) * multiple


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


class GPTNetwork(nn.Module):
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

    def moe_modules(self) -> dict[int, MoE]:
        """This rank's MoE layers by global layer index."""
        return {int(i): b.mlp for i, b in self.layers.items() if isinstance(b.mlp, MoE)}

    def pop_aux_loss(self) -> Tensor | None:
        """The MoE layers' weighted aux-loss sums since the last call (added to the loss sum)."""
        terms = [t for m in self.moe_modules().values() if (t := m.pop_aux()) is not None]
        return torch.stack(terms).sum() if terms else None

    def tie_weights(self) -> None:
        """Share the token embedding with the output head (again after sharding: see DESIGN §7)."""
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


class GPT(ParallelModule):
    """GPT-2 causal LM. Batches: ``{"input_ids": [B, T], "labels": [B, T]}`` (labels aligned, -100 ignored)."""

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
            lr_decay_steps: length of the cosine decay; defaults to the trainer's total steps.
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
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} is not valid: it must be > 0.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} is not valid: it must be >= 0.")
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        self.model: GPTNetwork | None = None
        self.val_loss = TokenMeanLoss()

    # ---- model protocol ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        layout = getattr(strategy, "layout", None)
        tp = layout.tp if layout is not None else 1
        self.model = GPTNetwork(self.config, self.config.padded_vocab_size(tp))
        if self.model.head is not None and self.model.head.weight.device.type != "meta":
            self.init_weights()

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
        kw = {"sequence_parallel": sequence_parallel}
        plan: dict[str, ParallelStyle] = {
            "model.embed.wte": VocabParallel(self.config.vocab_size, **kw),
            "model.embed.wpe": Replicated(**kw),
            "model.norm": Replicated(**kw),
        }
        moe = self.config.moe_layers
        if not moe:
            plan.update(block_tp_plan("model.layers.*", sequence_parallel))
        for i in range(self.config.n_layer) if moe else ():
            layer = block_tp_plan(f"model.layers.{i}", sequence_parallel)
            if i in moe:
                # Each expert is an MLP split like the dense one (the router stays whole on every tp rank).
                # Experts see whole sequences (the MoE layer gathers them under sequence parallel).
                layer = {k: v for k, v in layer.items() if ".mlp." not in k}
                layer[f"model.layers.{i}.mlp.experts.*.fc"] = ColumnParallel()
                layer[f"model.layers.{i}.mlp.experts.*.proj"] = RowParallel()
            plan.update(layer)
        assert self.model is not None
        if not self.config.tie_embeddings or self.model.embed is None:
            # Untied, or tied to an embedding on another pipeline rank: the head is sharded on its own.
            plan["model.head"] = VocabParallel(self.config.vocab_size, **kw)
        return plan

    def post_parallelize(self) -> None:
        """Re-tie weights that ``parallelize_module`` replaced, and give the head its TP role."""
        assert self.model is not None
        if self.config.tie_embeddings and self.model.embed is not None and self.model.head is not None:
            self.model.tie_weights()
            info = self.model.embed.wte.tp
            if info is not None:
                self.model.head.tp = replace(info, kind="column")

    def init_weights(self) -> None:
        """Fill the (materialised, possibly sharded) parameters: HF checkpoint or seeded random init."""
        assert self.model is not None
        if self.hparams.hf_checkpoint:
            from lightning_par.models.hf import gpt2_weight_source

            source = gpt2_weight_source(self.hparams.hf_checkpoint, self.model)
        else:
            source = self.model.random_init_source(self.init_seed)
        fill_parameters(self.model, source)

    # ---- forward / steps --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[B, T, V_local]`` (this rank's vocabulary slice under tensor parallel).

        Under pipeline parallel this runs every stage (forward only) and returns the logits on every rank.
        """
        return self._network_output(input_ids).transpose(0, 1)

    def _network_output(self, input_ids: Tensor) -> Tensor:
        assert self.model is not None, "call configure_model() first"
        pipeline = self._pipeline()
        if pipeline is not None:
            return pipeline.forward((input_ids,))
        return self.model(input_ids)

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss_sum, num_tokens)`` of the batch.

        Under pipeline parallel the schedule runs every microbatch through the stages (and, when training,
        every backward), and the result is the same on every rank.
        """
        assert self.model is not None
        pipeline = self._pipeline()
        if pipeline is not None:
            return pipeline.loss((batch["input_ids"],), batch["labels"])
        logits = self.model(batch["input_ids"])
        loss_sum, num_tokens = self.model.loss_fn(logits, batch["labels"])
        aux = self.model.pop_aux_loss()  # MoE load-balancing and z losses (training only)
        return (loss_sum if aux is None else loss_sum + aux), num_tokens

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The batch's token-mean loss, with its token count (the strategy weights micro-batches by it)."""
        out = self._training_output(*self._loss(batch))
        if self.config.num_experts:
            self._log_moe_statistics()
        return out

    def _log_moe_statistics(self) -> None:
        """Per MoE layer: tokens per expert, dropped fraction, aux and z losses, over the whole model replica
        set (summed over data-parallel replicas and pipeline stages; tp peers hold the same numbers)."""
        assert self.model is not None
        cfg = self.config
        rows, E = cfg.moe_layers, cfg.num_experts
        stats = torch.zeros(len(rows), E + len(STAT_FIELDS), device=self.device)
        for i, moe in self.model.moe_modules().items():
            got = moe.pop_stats()
            if got is not None:
                stats[rows.index(i)] = got.to(stats.device)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None and self.trainer.world_size > 1:
            total = getattr(strategy, "sum_over_replicas_and_stages", None)
            stats = total(stats) if total is not None else strategy.reduce(stats, reduce_op="sum")
        for r, i in enumerate(rows):
            load, (kept, assigned, aux_sum, z_sum, seqs, tokens) = stats[r, :E], stats[r, E:]
            prefix = f"moe/layer{i}"
            self.log(f"{prefix}/dropped_fraction", 1.0 - kept / assigned.clamp(min=1))
            self.log(f"{prefix}/aux_loss", aux_sum / seqs.clamp(min=1))
            self.log(f"{prefix}/z_loss", z_sum / tokens.clamp(min=1))
            self.log(f"{prefix}/load_imbalance", load.max() / load.mean().clamp(min=1e-9))
            for e in range(E):
                self.log(f"{prefix}/tokens_expert{e}", load[e])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss_sum, num_tokens = self._loss(batch)
        self.val_loss.update(loss_sum.detach(), num_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self.val_loss.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss))
        self.val_loss.reset()

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward): 6 x matmul parameters + attention.

        Matmul parameters are the blocks' linears (for a MoE layer: the top-k experts a token visits and the
        router) and the head (tied or not, it is a matmul); embeddings are
        lookups. Attention adds 12 x n_layer x seq_len x n_embd (scores and weighted values, fwd + bwd).
        """
        c = self.config
        moe = len(c.moe_layers)
        mlp = 8 * c.n_embd * c.n_embd
        matmul_params = (
            c.n_layer * 4 * c.n_embd * c.n_embd  # attention
            + (c.n_layer - moe) * mlp
            + moe * (c.moe_top_k * mlp + c.n_embd * c.num_experts)  # active experts and the router
            + c.vocab_size * c.n_embd
        )
        return 6.0 * matmul_params + 12.0 * c.n_layer * seq_len * c.n_embd

    # ---- Hugging Face and generation ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str, **overrides: Any) -> GPT:
        """A GPT whose weights come from a local Hugging Face GPT-2 directory (loaded when sharded)."""
        from lightning_par.models.hf import gpt2_config_kwargs

        kwargs = {**gpt2_config_kwargs(path), **overrides, "hf_checkpoint": str(path)}
        return cls(**kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> Tensor:
        """Sample continuations (one process or any tp layout: the vocab slices are gathered per step)."""
        assert self.model is not None
        was_training = self.training
        self.eval()
        ids = input_ids
        pipelined = self._pipeline() is not None
        for _ in range(max_new_tokens):
            ctx = ids[:, -self.config.block_size :]
            length = ctx.shape[1]
            if pipelined:
                # One shape for every step (the stages are built per shape): pad on the right, which a
                # causal model never looks at.
                ctx = F.pad(ctx, (0, self.config.block_size - length))
            logits = self._network_output(ctx)[length - 1]  # [B, V_local]
            logits = gather_vocab(logits, self.model.head.tp if self.model.head is not None else None)
            logits = logits[:, : self.config.vocab_size].float() / max(temperature, 1e-5)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1)
            info = self.model.head.tp if self.model.head is not None else None
            if info is not None:  # every tp rank must continue with the same token
                torch.distributed.broadcast(
                    nxt, src=torch.distributed.get_global_rank(info.group, 0), group=info.group
                )
            if pipelined:  # ... and every pipeline rank
                pipeline = self._pipeline()
                torch.distributed.broadcast(nxt, src=pipeline.last_stage_rank, group=pipeline.group)
            ids = torch.cat([ids, nxt], dim=1)
        self.train(was_training)
        return ids


def gather_vocab(logits: Tensor, info: Any) -> Tensor:
    """Concatenate vocabulary slices over tp (only for sampling and tests: training never does this)."""
    if info is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(info.size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)
