"""BERT LightningModules: masked-LM pretraining (:class:`BERT`) and sequence classification
(:class:`BERTClassifier`), on every layout the strategy offers.

Batches follow Hugging Face: ``input_ids`` ``[B, T]``, optional ``attention_mask`` and ``token_type_ids``
``[B, T]``, and ``labels`` (``[B, T]`` original token ids at the masked-LM positions, -100 elsewhere; or
``[B]`` class ids / float targets). The masking itself (15% of tokens, 80/10/10) is done by the data
collator (:class:`lightning_par.data_bert.MLMCollator`), so every tensor and pipeline peer sees the same
masked batch. The network is :class:`lightning_par.models.bert.BERTNetwork`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_par.models.base import ParallelModule
from lightning_par.models.bert import (
    IGNORE_INDEX,
    BERTConfig,
    BERTNetwork,
    VocabParallelWithBias,
    check_sequence_length,
)
from lightning_par.models.blocks import block_tp_plan
from lightning_par.models.metrics import TokenAccuracy, TokenMeanLoss, vocab_parallel_argmax
from torch import Tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_par.initialization import fill_parameters
from lightning_par.tensor_parallel.styles import VocabParallel


class _BERTModule(ParallelModule):
    """What the two BERT tasks share: the model protocol, batch checks, steps and optimisation."""

    config: BERTConfig
    no_weight_decay = ("wpe", "tte")  # position and token-type embeddings

    def _setup(self, config: BERTConfig, init_seed: int | None) -> None:
        hp = self.hparams
        if hp.learning_rate <= 0:
            raise ValueError(f"learning_rate={hp.learning_rate} is not valid: it must be > 0.")
        if hp.warmup_steps < 0:
            raise ValueError(f"warmup_steps={hp.warmup_steps} is not valid: it must be >= 0.")
        self.config = config
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        self.model: BERTNetwork | None = None
        self.val_loss = TokenMeanLoss()

    # ---- model protocol ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        layout = getattr(strategy, "layout", None)
        tp = layout.tp if layout is not None else 1
        self.model = BERTNetwork(self.config, self.config.padded_vocab_size(tp))
        if next(self.model.parameters()).device.type != "meta":
            self.init_weights()

    def check_layout(self, tensor_parallel_size: int, sequence_parallel: bool) -> None:
        """Raise before any work if this model cannot be split ``tensor_parallel_size`` ways."""
        cfg = self.config
        if sequence_parallel:
            raise ValueError(
                "sequence_parallel=True is not supported by BERT (the pooler and the padding mask need the "
                "whole sequence on every tensor-parallel rank); use sequence_parallel=False."
            )
        for name, value in (("n_head", cfg.n_head), ("intermediate_size", cfg.mlp_hidden)):
            if value % tensor_parallel_size:
                valid = [
                    d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0 and cfg.mlp_hidden % d == 0
                ]
                raise ValueError(
                    f"tensor_parallel_size={tensor_parallel_size} does not divide {name}={value}; "
                    f"valid tensor_parallel_size for this model: {valid}."
                )

    def tensor_parallel_plan(self, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        kw = {"sequence_parallel": sequence_parallel}
        plan: dict[str, ParallelStyle] = {
            "model.embed.wte": VocabParallel(self.config.vocab_size, **kw),
            **block_tp_plan("model.layers.*", sequence_parallel),
        }
        if self.config.num_labels is None:
            plan["model.head.decoder"] = VocabParallelWithBias(self.config.vocab_size, **kw)
        # Everything else (position/token-type embeddings, LayerNorms, pooler, classifier, MLM transform)
        # stays whole on every rank: the strategy makes it Replicate().
        return plan

    def post_parallelize(self) -> None:
        """Re-tie the MLM decoder to the word embedding (both ``Shard(0)`` over the vocabulary)."""
        assert self.model is not None
        self.model.tie_weights()

    def init_weights(self) -> None:
        """Fill the (materialised, possibly sharded) parameters: HF checkpoint or seeded random init."""
        assert self.model is not None
        if self.hparams.hf_checkpoint:
            from lightning_par.models.hf_bert import bert_weight_source

            source = bert_weight_source(self.hparams.hf_checkpoint, self.model)
        else:
            source = self.model.random_init_source(self.init_seed)
        fill_parameters(self.model, source)

    # ---- batches ------------------------------------------------------------------------------------
    def check_batch(self, batch: dict[str, Tensor]) -> None:
        """Raise, naming the value and the valid range, before a batch reaches the network.

        Costs one host sync per batch (a bad label would otherwise give a silently wrong loss under tensor
        parallel, or a device-side assert on CUDA).
        """
        ids = batch["input_ids"]
        check_sequence_length(ids.shape[1], self.config.max_position_embeddings)
        # (name, tensor, limit name, limit): values must lie in 0..limit - 1.
        checks = [("input_ids", ids, "vocab_size", self.config.vocab_size)]
        types = batch.get("token_type_ids")
        if types is not None:
            checks.append(("token_type_ids", types, "type_vocab_size", self.config.type_vocab_size))
        labels = batch.get("labels")
        if labels is not None and self.label_range is not None:
            checks.append(("labels", labels, *self.label_range))
        bad = []
        for _, t, _, n in checks:
            valid = t != IGNORE_INDEX if t is labels else torch.ones_like(t, dtype=torch.bool)
            bad.append(((t < 0) | (t >= n)) & valid)
        flags = torch.stack([b.any() for b in bad]).tolist()
        for (name, t, limit, n), b, flag in zip(checks, bad, flags, strict=True):
            if flag:
                value = t[b][0].item()
                extra = " or -100 (ignored)" if name == "labels" else ""
                raise ValueError(
                    f"{name} holds {value}, outside the valid range 0..{n - 1}{extra} ({limit}={n})."
                )

    @property
    def label_range(self) -> tuple[str, int] | None:
        """Labels must lie in ``0..n - 1`` for ``(name of n, n)``; ``None``: float targets, not checked."""
        return ("vocab_size", self.config.vocab_size)

    def _model_kwargs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("attention_mask", "token_type_ids") if batch.get(k) is not None}

    def _network_output(self, batch: dict[str, Tensor]) -> Tensor:
        """The network's output for the batch; under pipeline parallel, forward only, on every rank."""
        assert self.model is not None, "call configure_model() first"
        pipeline = self._pipeline()
        if pipeline is not None:
            return pipeline.forward((batch["input_ids"],), self._model_kwargs(batch))
        return self.model(batch["input_ids"], **self._model_kwargs(batch))

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(loss_sum, num_counted)``; under pipeline parallel the schedule runs every stage (and backward)."""
        assert self.model is not None
        pipeline = self._pipeline()
        if pipeline is not None:
            return pipeline.loss((batch["input_ids"],), batch["labels"], self._model_kwargs(batch))
        return self.model.loss_fn(self._network_output(batch), batch["labels"])

    # ---- steps --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The batch's mean loss over counted items, with their count (the strategy weights by it)."""
        self.check_batch(batch)
        return self._training_output(*self._loss(batch))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.check_batch(batch)
        assert self.model is not None
        output = self._network_output(batch)
        loss_sum, count = self.model.loss_fn(output, batch["labels"])
        self.val_loss.update(loss_sum, count)
        self.update_metrics(output, batch["labels"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The logits of :meth:`forward` (returned on every rank, also under pipeline parallel)."""
        self.check_batch({k: v for k, v in batch.items() if k != "labels"})
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", prog_bar=False)

    def update_metrics(self, output: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def compute_metrics(self) -> dict[str, Tensor]:
        """Every metric of the epoch (reduced over data-parallel ranks), then reset."""
        raise NotImplementedError

    def _log_metrics(self, prefix: str, prog_bar: bool) -> None:
        for name, value in self.compute_metrics().items():
            self.log(f"{prefix}/{name}", value, prog_bar=prog_bar and name == "loss")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters (blocks, head) + attention (fwd + bwd)."""
        c = self.config
        block = 4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.mlp_hidden
        head = c.n_embd * c.n_embd + (c.vocab_size * c.n_embd if c.num_labels is None else 0)
        return 6.0 * (c.n_layer * block + head) + 12.0 * c.n_layer * seq_len * c.n_embd

    def export_hf(self, out_dir: str) -> Any:
        """Write a Hugging Face directory (one process, unsharded weights): see ``hf_bert.export_bert``."""
        from lightning_par.models.hf_bert import export_bert

        return export_bert(self, out_dir)


class BERT(_BERTModule):
    """BERT masked-LM pretraining; logs loss, perplexity and accuracy on the masked tokens.

    Args:
        vocab_size: real tokens (the data module's tokenizer with its special tokens).
        intermediate_size: MLP width; ``None``: 4 * n_embd.
        max_position_embeddings: the longest sequence the model accepts.
        learning_rate: peak AdamW learning rate, reached after ``warmup_steps``.
        min_lr_ratio: the cosine schedule decays to ``learning_rate * min_lr_ratio``.
        weight_decay: applied to matrices only (not to biases, LayerNorms or position/type embeddings).
        lr_decay_steps: length of the cosine decay; defaults to the trainer's total steps.
        init_seed: seed of the weight initialisation; defaults to the global seed at construction.
        hf_checkpoint: a local Hugging Face ``BertForMaskedLM`` directory to load instead of random weights.
    """

    def __init__(
        self,
        vocab_size: int = 4100,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        pad_vocab_size_multiple: int = 64,
        learning_rate: float = 3e-4,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        lr_decay_steps: int | None = None,
        init_seed: int | None = None,
        hf_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = BERTConfig(
            vocab_size, n_layer, n_head, n_embd, intermediate_size, max_position_embeddings,
            type_vocab_size, dropout, layer_norm_eps, pad_vocab_size_multiple, num_labels=None,
        )  # fmt: skip
        self._setup(cfg, init_seed)
        self.val_accuracy = TokenAccuracy()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B, T, V_local]`` (this rank's vocabulary slice under tensor parallel)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self._network_output(batch).transpose(0, 1)

    def update_metrics(self, output: Tensor, labels: Tensor) -> None:
        assert self.model is not None
        predicted = vocab_parallel_argmax(output, self.model.vocab_info(), self.config.vocab_size)
        self.val_accuracy.update(predicted, labels.t())

    def compute_metrics(self) -> dict[str, Tensor]:
        loss = self.val_loss.compute()
        out = {"loss": loss, "ppl": torch.exp(loss), "accuracy": self.val_accuracy.compute()}
        self.val_loss.reset()
        self.val_accuracy.reset()
        return out

    @classmethod
    def from_hf(cls, path: str, **overrides: Any) -> BERT:
        """A BERT whose weights come from a local ``BertForMaskedLM`` directory (loaded when sharded)."""
        from lightning_par.models.hf_bert import bert_config_kwargs

        kwargs = {**bert_config_kwargs(path, task="mlm"), **overrides, "hf_checkpoint": str(path)}
        return cls(**kwargs)


class BERTClassifier(_BERTModule):
    """BERT sequence classification on the pooled [CLS] token (cross-entropy; ``num_labels=1``: regression).

    Logs loss, accuracy and macro F1 (classification) or the mean squared error (regression). The
    arguments are those of :class:`BERT`, plus ``num_labels``; ``hf_checkpoint`` is a local
    ``BertForSequenceClassification`` directory.
    """

    def __init__(
        self,
        num_labels: int = 2,
        vocab_size: int = 4100,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        pad_vocab_size_multiple: int = 64,
        learning_rate: float = 5e-5,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 10,
        lr_decay_steps: int | None = None,
        init_seed: int | None = None,
        hf_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cfg = BERTConfig(
            vocab_size, n_layer, n_head, n_embd, intermediate_size, max_position_embeddings,
            type_vocab_size, dropout, layer_norm_eps, pad_vocab_size_multiple, num_labels=num_labels,
        )  # fmt: skip
        self._setup(cfg, init_seed)
        if num_labels > 1:
            self.val_accuracy = MulticlassAccuracy(num_labels, average="micro", ignore_index=IGNORE_INDEX)
            self.val_f1 = MulticlassF1Score(num_labels, average="macro", ignore_index=IGNORE_INDEX)

    @property
    def label_range(self) -> tuple[str, int] | None:
        return None if self.config.num_labels == 1 else ("num_labels", self.config.num_labels)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Logits ``[B, num_labels]`` (whole on every rank)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self._network_output(batch)

    def update_metrics(self, output: Tensor, labels: Tensor) -> None:
        if self.config.num_labels == 1:
            return  # regression: the loss (mean squared error) is the metric
        predicted = output.argmax(-1)
        self.val_accuracy.update(predicted, labels)
        self.val_f1.update(predicted, labels)

    def compute_metrics(self) -> dict[str, Tensor]:
        out = {"loss": self.val_loss.compute()}
        self.val_loss.reset()
        if self.config.num_labels > 1:
            out["accuracy"] = self.val_accuracy.compute()
            out["f1"] = self.val_f1.compute()
            self.val_accuracy.reset()
            self.val_f1.reset()
        return out

    @classmethod
    def from_hf(cls, path: str, **overrides: Any) -> BERTClassifier:
        """A classifier whose weights come from a local ``BertForSequenceClassification`` directory."""
        from lightning_par.models.hf_bert import bert_config_kwargs

        kwargs = {**bert_config_kwargs(path, task="classification"), **overrides, "hf_checkpoint": str(path)}
        return cls(**kwargs)


__all__ = ["BERT", "BERTClassifier"]
