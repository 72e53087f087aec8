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

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning_par.models.base import ParallelModule
from lightning_par.models.blocks import block_tp_plan
from lightning_par.models.gpt_network import GPTConfig, GPTNetwork  # noqa: E402
from lightning_par.models.metrics import TokenMeanLoss
from torch import Tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.experts.layer import STAT_FIELDS
from lightning_par.initialization import fill_parameters
from lightning_par.tensor_parallel.comm import TPInfo
from lightning_par.tensor_parallel.styles import ColumnParallel, Replicated, RowParallel, VocabParallel


class GPT(ParallelModule):
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

    def check_batch(self, input_ids: Tensor, labels: Tensor | None = None) -> None:
        """Raise, naming the value and what is valid, before a batch reaches the network.

        Without it a token id outside the vocabulary ends in ``IndexError: index out of range in self`` (a
        device-side assert on CUDA; under pipeline parallel on the first stage only, while the other ranks
        wait), and labels of another shape in cross-entropy's batch-size message. Cost: the shape checks are
        free; the id range costs ``ids.min()`` and ``ids.max()`` (two reductions over ``[B, T]``) and one
        host read per batch (a device sync on GPU), paid only in the steps where a bad id would crash.
        """
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}: it must be [batch, sequence] (2 dimensions)."
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids has dtype {input_ids.dtype}: it must hold integer token ids.")
        if input_ids.shape[1] > self.config.block_size:
            raise ValueError(
                f"input_ids: sequence length {input_ids.shape[1]} exceeds block_size={self.config.block_size}; "
                f"use sequences of at most {self.config.block_size} tokens."
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but input_ids has shape {tuple(input_ids.shape)}: "
                "labels must be aligned with input_ids (the same [batch, sequence] shape; the model shifts "
                "them), with -100 at ignored positions."
            )
        if input_ids.numel() == 0:
            return
        n = self.config.vocab_size
        # Two reductions and one host read (a sync on GPU): what replacing the embedding's crash costs.
        lo, hi = torch.stack([input_ids.min(), input_ids.max()]).tolist()
        if lo < 0 or hi >= n:
            value = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids holds the token id {value}, outside the valid range 0..{n - 1} (vocab_size={n})."
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The batch's token-mean loss, with its token count (the strategy weights micro-batches by it)."""
        self.check_batch(batch["input_ids"], batch["labels"])
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
        self.check_batch(batch["input_ids"], batch["labels"])
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

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Logits over the whole vocabulary, ``[B, T, vocab_size]``, as a Hugging Face model's ``logits``.

        ``batch`` is a dict with ``input_ids`` (``labels`` optional, unused) or a ``[B, T]`` tensor of ids
        (or a one-element list / tuple of it, as a ``TensorDataset`` loader gives). The vocabulary slices
        are gathered over tp and the padded rows dropped, on every rank of every layout (under pipeline
        parallel the stages run forward only and every rank receives the last stage's logits).
        """
        input_ids = _predict_ids(batch)
        self.check_batch(input_ids)  # labels, when the batch has them, are not used here
        logits = gather_vocab(self(input_ids), self._vocab_info())
        return logits[..., : self.config.vocab_size].contiguous()  # not a view holding the padded rows

    def _vocab_info(self) -> TPInfo | None:
        """How the logits are split over the vocabulary (``None``: not split), also on ranks without the head.

        Under pipeline parallel every rank receives the last stage's logits: its own tp rank's slice, so it
        gathers over the same tp group as the head.
        """
        assert self.model is not None
        if self.model.head is not None:
            return self.model.head.tp
        if self.model.embed is not None:
            return self.model.embed.wte.tp
        layer = next(iter(self.model.layers.values()), None)
        return layer.tp_info() if layer is not None else None

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


def _predict_ids(batch: Any) -> Tensor:
    """The token ids of a predict batch: ``batch["input_ids"]``, the tensor itself, or ``batch[0]``."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(
                f"the predict batch is a dict with keys {sorted(batch)}: it needs 'input_ids' ([B, T] token ids)."
            )
        return batch["input_ids"]
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and len(batch) == 1 and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(
        f"the predict batch is a {type(batch).__name__}: give a dict with 'input_ids', a [B, T] tensor of "
        "token ids, or a one-element list or tuple of it."
    )


def gather_vocab(logits: Tensor, info: Any) -> Tensor:
    """Concatenate vocabulary slices over tp (for sampling and predict only: training never does this)."""
    if info is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(info.size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=info.group)
    return torch.cat(parts, dim=-1)
