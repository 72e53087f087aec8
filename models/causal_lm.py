"""What the causal language models (GPT, Llama / Mixtral) share, written once for every layout.

:class:`CausalLM` is the LightningModule machinery: building the network (``configure_model``), the
tensor-parallel plan's skeleton (vocabulary-parallel embedding and head, replicated final norm, each
block's plan from the subclass, experts split like the dense MLP), re-tying after sharding, the loss
through the pipeline runner when there is one, batch checks, training / validation / test / predict
steps, MoE statistics, generation and FLOPs per token; the network's shared half is
:class:`lightning_par.models.lm_network.CausalLMNetwork`.

A subclass gives ``config`` (a dataclass with ``vocab_size``, ``n_layer``, ``n_embd``, ``block_size``,
``tie_embeddings``, ``num_experts``, ``moe_layers`` and ``padded_vocab_size(tp)``) and implements
``_build_network``, ``block_plan``, ``matmul_params_per_token``, ``hf_config_kwargs`` and
``hf_weight_source``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from lightning_par.models.base import ParallelModule
from lightning_par.models.lm_network import CausalLMNetwork
from lightning_par.models.metrics import TokenMeanLoss
from torch import Tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_par.experts.layer import STAT_FIELDS
from lightning_par.initialization import fill_parameters
from lightning_par.tensor_parallel.comm import TPInfo
from lightning_par.tensor_parallel.styles import Replicated, VocabParallel


class CausalLM(ParallelModule, metaclass=ABCMeta):
    """Causal LM on every layout. Batches: ``{"input_ids": [B, T], "labels": [B, T]}`` (labels aligned,
    -100 ignored); ``predict`` also takes batches without labels, or plain ``[B, T]`` tensors of token ids.
    """

    model: CausalLMNetwork | None

    def _setup_common(self, learning_rate: float, warmup_steps: int, init_seed: int | None) -> None:
        """Checks and state every subclass ``__init__`` needs, after ``save_hyperparameters``."""
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} is not valid: it must be > 0.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} is not valid: it must be >= 0.")
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        self.model = None
        self.val_loss = TokenMeanLoss()

    # ---- what a family gives ----------------------------------------------------------------------
    @abstractmethod
    def _build_network(self, padded_vocab: int) -> CausalLMNetwork:
        """The full-size network with the vocabulary padded to ``padded_vocab`` rows."""

    @abstractmethod
    def block_plan(self, prefix: str, sequence_parallel: bool, moe: bool) -> dict[str, ParallelStyle]:
        """The tensor-parallel plan of the block(s) under ``prefix`` (``moe``: its MLP is a MoE layer)."""

    @abstractmethod
    def matmul_params_per_token(self) -> int:
        """The parameters a token is multiplied with (blocks' linears, active experts, router, head)."""

    @staticmethod
    @abstractmethod
    def hf_config_kwargs(path: str) -> dict[str, Any]:
        """Constructor kwargs from a local Hugging Face directory's ``config.json``."""

    @abstractmethod
    def hf_weight_source(self, path: str) -> Callable[..., Tensor]:
        """``source(name, shape, shard)`` reading this rank's slices from a Hugging Face directory."""

    # ---- model protocol ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        layout = getattr(strategy, "layout", None)
        tp = layout.tp if layout is not None else 1
        self.model = self._build_network(self.config.padded_vocab_size(tp))
        if self.model.head is not None and self.model.head.weight.device.type != "meta":
            self.init_weights()

    def tensor_parallel_plan(self, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        kw = {"sequence_parallel": sequence_parallel}
        plan: dict[str, ParallelStyle] = {
            "model.embed.wte": VocabParallel(self.config.vocab_size, **kw),
            "model.norm": Replicated(**kw),
        }
        moe = self.config.moe_layers
        if not moe:
            plan.update(self.block_plan("model.layers.*", sequence_parallel, moe=False))
        for i in range(self.config.n_layer) if moe else ():
            plan.update(self.block_plan(f"model.layers.{i}", sequence_parallel, moe=i in moe))
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
        path = self.hparams.get("hf_checkpoint")
        source = self.hf_weight_source(path) if path else self.model.random_init_source(self.init_seed)
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

        Matmul parameters (:meth:`matmul_params_per_token`) are the blocks' linears (for a MoE layer: the
        top-k experts a token visits and the router) and the head (tied or not, it is a matmul); embeddings
        are lookups. Attention adds 12 x n_layer x seq_len x n_embd (scores and weighted values, fwd + bwd;
        the query heads' width is n_embd whatever the number of key/value heads).
        """
        c = self.config
        return 6.0 * self.matmul_params_per_token() + 12.0 * c.n_layer * seq_len * c.n_embd

    # ---- Hugging Face and generation ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str, **overrides: Any) -> CausalLM:
        """A model whose weights come from a local Hugging Face directory (read when sharded: each rank
        reads only its slices)."""
        kwargs = {**cls.hf_config_kwargs(path), **overrides, "hf_checkpoint": str(path)}
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
