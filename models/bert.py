"""The BERT encoder network (post-LN, bidirectional, padding mask) built from the blocks GPT uses.

It follows the model protocol of ``lightning_par`` (README, "Bring your own model"), so the strategy
shards it exactly as it shards GPT:

* ``embed`` (first pipeline stage): word (vocabulary-parallel), position and token-type embeddings,
  LayerNorm, dropout;
* ``layers``: :class:`lightning_par.models.blocks.Block` with ``causal=False, pre_norm=False`` and exact
  (erf) GELU, keyed by global layer index, with the tensor-parallel plan of GPT's blocks;
* no final ``norm`` (post-LN blocks end normalised); ``head`` (last stage): the masked-LM head (transform,
  LayerNorm, decoder tied to the word embedding, vocabulary-parallel) or the classification head (pooler
  on [CLS], classifier).

The padding mask (``attention_mask``, ``[B, T]``) and ``token_type_ids`` are keyword arguments of
``forward``: under pipeline parallel the runner hands them to every stage (every pp rank has the batch),
so nothing but activations travels between stages. The LightningModules are in ``bert_tasks.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning_par.models.blocks import Block
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import Shard as ShardPlacement

from lightning_par.initialization import Shard, name_seed
from lightning_par.optim.gradients import local
from lightning_par.tensor_parallel.comm import TPInfo
from lightning_par.tensor_parallel.layers import (
    LayerNorm,
    ParallelEmbedding,
    ParallelLinear,
    vocab_parallel_cross_entropy,
)
from lightning_par.tensor_parallel.styles import VocabParallel

IGNORE_INDEX = -100


@dataclass
class BERTConfig:
    """Shape and regularisation of a BERT encoder (Hugging Face ``BertConfig`` names where they differ)."""

    vocab_size: int = 4100
    """Number of real tokens (padded internally to ``pad_vocab_size_multiple``)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate_size: int | None = None
    """Width of the MLP; ``None``: 4 * n_embd."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position embeddings cover."""
    type_vocab_size: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    pad_vocab_size_multiple: int = 64
    num_labels: int | None = None
    """``None``: masked-LM head; ``n >= 1``: classification head with ``n`` labels (1: regression)."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_embd",
            "max_position_embeddings",
            "type_vocab_size",
            "pad_vocab_size_multiple",
        ):
            _check_positive(name, getattr(self, name))
        if self.intermediate_size is not None:
            _check_positive("intermediate_size", self.intermediate_size)
        if self.num_labels is not None and (
            isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1
        ):
            raise ValueError(
                f"num_labels={self.num_labels!r} is not valid: it must be an integer >= 1 "
                f"(1: regression, 2 or more: classification)."
            )
        if self.n_embd % self.n_head:
            valid = [d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0][:12]
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (valid: {valid}...)."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not valid: it must be in [0, 1).")

    @property
    def mlp_hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        multiple = math.lcm(self.pad_vocab_size_multiple, tensor_parallel_size)
        return -(-self.vocab_size // multiple) * multiple


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid: it must be a positive integer.")


class DenseLinear(nn.Linear):
    """A linear kept whole on every tp rank (MLM transform, pooler, classifier).

    Its parameters become ``Replicate()`` DTensors under tensor parallel; the forward uses their local
    values (a :class:`ParallelLinear` left out of a plan would take the row-parallel path instead).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, local(self.weight), local(self.bias))


class VocabParallelWithBias(VocabParallel):
    """:class:`VocabParallel` for an output head with a per-token bias: the bias is split like the rows."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        super()._apply(module, device_mesh)
        bias = module.bias
        if bias is not None and not isinstance(bias, DTensor):
            dt = distribute_tensor(bias.data, device_mesh, [ShardPlacement(0)], src_data_rank=None)
            module.register_parameter("bias", nn.Parameter(dt, requires_grad=bias.requires_grad))
        return module


class BERTEmbedding(nn.Module):
    """Word + position + token-type embeddings, LayerNorm and dropout (first pipeline stage)."""

    def __init__(self, cfg: BERTConfig, padded_vocab: int) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(padded_vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.n_embd)
        self.tte = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.ln = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        x = self.wte(input_ids.t())  # [T, B, C]
        x = x + local(self.wpe.weight)[: x.shape[0]].unsqueeze(1)
        if token_type_ids is None:
            x = x + local(self.tte.weight)[0]
        else:
            x = x + F.embedding(token_type_ids.t(), local(self.tte.weight))
        return self.drop(self.ln(x))


class MLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm) and the decoder over the vocabulary (weight tied to ``wte``)."""

    def __init__(self, cfg: BERTConfig, padded_vocab: int) -> None:
        super().__init__()
        self.dense = DenseLinear(cfg.n_embd, cfg.n_embd)
        self.ln = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.decoder = ParallelLinear(cfg.n_embd, padded_vocab, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))))  # [T, B, V_local]


class ClassificationHead(nn.Module):
    """Pooler (dense + tanh on the first token, [CLS]), dropout and the classifier: ``[B, num_labels]``."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        assert cfg.num_labels is not None
        self.pooler = DenseLinear(cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = DenseLinear(cfg.n_embd, cfg.num_labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.drop(torch.tanh(self.pooler(x[0]))))


class BERTNetwork(nn.Module):
    """The BERT network; masked-LM logits ``[T, B, V_local]`` or classification logits ``[B, num_labels]``."""

    def __init__(self, cfg: BERTConfig, padded_vocab: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = padded_vocab
        self.embed: BERTEmbedding | None = BERTEmbedding(cfg, padded_vocab)
        self.layers = nn.ModuleDict(
            {
                str(i): Block(
                    cfg.n_embd,
                    cfg.n_head,
                    bias=True,
                    dropout=cfg.dropout,
                    causal=False,
                    pre_norm=False,
                    layer_norm_eps=cfg.layer_norm_eps,
                    mlp_hidden=cfg.mlp_hidden,
                    gelu="none",
                )
                for i in range(cfg.n_layer)
            }
        )
        self.norm: nn.Module | None = None  # post-LN: every block already ends with a LayerNorm
        self.head: nn.Module | None = (
            MLMHead(cfg, padded_vocab) if cfg.num_labels is None else ClassificationHead(cfg)
        )
        # Where the last stage's output keeps the batch (the pipeline runner merges microbatches there).
        self.output_batch_dim = 1 if cfg.num_labels is None else 0
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the word embedding with the MLM decoder (again after sharding: ``parallelize_module`` replaces parameters, which unties them)."""
        if isinstance(self.head, MLMHead) and self.embed is not None:
            self.head.decoder.weight = self.embed.wte.weight

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """``x``: token ids ``[B, T]`` on the first stage, activations ``[T, B, C]`` after it.

        ``attention_mask`` (``[B, T]``, 1 = real token, 0 = padding) hides padded keys in every layer.
        """
        if self.embed is not None:
            check_sequence_length(x.shape[1], self.cfg.max_position_embeddings)
            x = self.embed(x, token_type_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers.values():
            x = layer(x, mask)
        if self.head is not None:
            x = self.head(x)
        return x

    def loss_fn(self, output: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss summed over counted items, number of counted items)``; label ``-100`` is ignored.

        Masked LM: ``output`` ``[T, B, V_local]``, ``labels`` ``[B, T]`` (the original token at selected
        positions, -100 elsewhere); vocabulary-parallel cross-entropy, padded vocabulary rows masked out.
        Classification: ``output`` ``[B, num_labels]``, ``labels`` ``[B]``; cross-entropy, or squared
        error when ``num_labels == 1`` (regression, float labels).
        """
        if self.cfg.num_labels is None:
            info = self.vocab_info()
            if info is None:
                output = output[..., : self.cfg.vocab_size]
            return vocab_parallel_cross_entropy(output, labels.t(), info)
        counted = labels != IGNORE_INDEX
        if self.cfg.num_labels == 1:
            err = (output.float().squeeze(-1) - labels.float()) ** 2
            return (err * counted).sum(), counted.sum()
        safe = labels.long().masked_fill(~counted, 0)
        loss = F.cross_entropy(output.float(), safe, reduction="none")
        return (loss * counted).sum(), counted.sum()

    def vocab_info(self) -> TPInfo | None:
        """How the masked-LM logits are split over the vocabulary (``None``: not split).

        Also on pipeline ranks without the head: validation under pipeline parallel hands the last stage's
        logits to every rank, which computes the loss and accuracy on them.
        """
        if self.head is not None:
            return self.head.decoder.tp
        layer = next(iter(self.layers.values()), None)
        info = layer.tp_info() if layer is not None else None
        if info is None:
            return None
        rows = self.padded_vocab // info.size
        return TPInfo(
            kind="column",
            group=info.group,
            rank=info.rank,
            size=info.size,
            sequence_parallel=False,
            vocab_start=info.rank * rows,
            num_real_rows=self.cfg.vocab_size,
        )

    @staticmethod
    def count_loss_tokens(labels: Tensor) -> Tensor:
        """The number of items :meth:`loss_fn` counts (known before any stage runs: pipeline scaling)."""
        return (labels != IGNORE_INDEX).sum()

    # ---- initialisation: same numbers on every layout ---------------------------------------------
    def random_init_source(self, seed: int, initializer_range: float = 0.02) -> Callable[..., Tensor]:
        """BERT's init: N(0, initializer_range) for matrices and embeddings, zero biases, unit LayerNorm.

        Each parameter comes from a generator seeded by the run seed and its global name, so every
        layout starts from the same weights; padded vocabulary rows are zero.
        """

        def source(name: str, shape: torch.Size, shard: Shard | None = None) -> Tensor:
            if name == "head.decoder.weight":
                name = "embed.wte.weight"  # a pipeline rank holding only the head: the tie's numbers
            if name.endswith("bias"):
                return torch.zeros(shape)
            if name.endswith("ln.weight") or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                return torch.ones(shape)
            gen = torch.Generator().manual_seed(name_seed(seed, name))
            full = torch.empty(shape).normal_(0.0, initializer_range, generator=gen)
            if name == "embed.wte.weight":
                full[self.cfg.vocab_size :] = 0.0
            return full

        return source


def check_sequence_length(length: int, max_position_embeddings: int) -> None:
    """Raise (naming the limit) for a sequence the position embeddings do not cover."""
    if length > max_position_embeddings:
        raise ValueError(
            f"sequence length {length} exceeds max_position_embeddings={max_position_embeddings}; "
            f"valid lengths: 1..{max_position_embeddings} (truncate the inputs or use a model with more positions)."
        )
