"""The shape of the model a layout is planned for, from a GPT or Llama module, its config, a YAML or HF
file, or flags.

Everything the cost model needs is here, counted the way the code builds the network: the vocabulary
padded to a multiple of 64 and of tp (``GPTConfig.padded_vocab_size``), pre-norm blocks whose halves
(attention, MLP) a pipeline stage may cut between, and mixture-of-experts MLPs on every
``moe_layer_freq``-th block. ``family="gpt"``: learned positions for ``block_size`` tokens, LayerNorm,
a 4h GELU MLP of two matrices, ``n_head`` key/value heads. ``family="llama"`` (Llama, Mistral, Mixtral):
rotary positions (no table), RMSNorm (one weight), no biases, grouped-query attention with ``n_kv_head``
key/value heads, a SwiGLU MLP of three matrices ``intermediate_size`` wide, zero-padded to a multiple of
``pad_intermediate_size_multiple`` (``LlamaConfig.padded_intermediate_size``), untied head by default.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FAMILIES = ("gpt", "llama")
LLAMA_TYPES = ("llama", "mistral", "mixtral")
"""Hugging Face ``model_type`` values planned as :class:`lightning_par.models.Llama`."""
LLAMA_DEFAULTS = dict(
    vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=688, block_size=256
)
"""``Llama.__init__``'s defaults (``max_position_embeddings`` is ``block_size``)."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder as :class:`lightning_par.models.GPT` (``family="gpt"``) or
    :class:`lightning_par.models.Llama` (``family="llama"``: Llama, Mistral, Mixtral) builds it."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int = 2048
    bias: bool = True
    """GPT's linear and LayerNorm biases (always ``False`` under Llama)."""
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 64
    num_experts: int = 0
    moe_top_k: int = 2
    moe_layer_freq: int = 2
    family: str = "gpt"
    intermediate_size: int | None = None
    """Llama's SwiGLU width (required for it); GPT's MLP is 4 ``n_embd`` wide (``None``)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention, Llama); ``None``: ``n_head``."""
    pad_intermediate_size_multiple: int = 16
    recompute_stops_early: bool = True
    """A recomputed block runs its forward again only up to its last saved tensor, as this code does
    (torch's non-reentrant checkpoint): not its last linear nor that linear's tp reduction. ``False``: the
    whole forward runs again, as Megatron-LM's reentrant ``CheckpointFunction`` does (its published runs)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not valid: give one of {list(FAMILIES)}.")
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size", "pad_vocab_size_multiple"):
            _positive(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; valid n_head: "
                f"{[d for d in range(1, min(self.n_embd, 256) + 1) if self.n_embd % d == 0]}."
            )
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} is not valid: it must be 0 (dense) or >= 1.")
        if self.family == "gpt":
            if self.intermediate_size is not None:
                raise ValueError(
                    f"intermediate_size={self.intermediate_size} is not valid for family='gpt' (its MLP is "
                    f"4 n_embd wide): leave it None, or give family='llama'."
                )
            if self.n_kv_head not in (None, self.n_head):
                raise ValueError(
                    f"n_kv_head={self.n_kv_head} is not valid for family='gpt' (GPT has n_head={self.n_head} "
                    f"key/value heads): leave it None, or give family='llama'."
                )
            return
        object.__setattr__(self, "bias", False)  # (Llama has no biases)
        if self.intermediate_size is None:
            raise ValueError(
                "family='llama' needs intermediate_size (the SwiGLU MLP's width), an integer >= 1."
            )
        _positive("intermediate_size", self.intermediate_size)
        _positive("pad_intermediate_size_multiple", self.pad_intermediate_size_multiple)
        if self.n_kv_head is not None:
            _positive("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                valid = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
                raise ValueError(
                    f"n_kv_head={self.n_kv_head} is not valid: it must divide n_head={self.n_head} (every kv "
                    f"head serves the same number of query heads); valid n_kv_head: {valid}."
                )
        if self.head_dim % 2:
            raise ValueError(
                f"n_embd={self.n_embd} / n_head={self.n_head} = head_dim {self.head_dim} is not valid for "
                f"family='llama': rotary positions need an even head_dim."
            )

    # ---- derived shapes ----------------------------------------------------------------------------
    @property
    def llama(self) -> bool:
        """RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases."""
        return self.family == "llama"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn(self) -> int:
        """The network's MLP width: 4 h (GPT) or ``intermediate_size`` padded (Llama)."""
        if not self.llama:
            return 4 * self.n_embd
        assert self.intermediate_size is not None
        step = self.pad_intermediate_size_multiple
        return -(-self.intermediate_size // step) * step

    @property
    def norm_params(self) -> int:
        """Elements of one norm: LayerNorm weight (and bias), RMSNorm weight."""
        return self.n_embd * (1 + int(self.bias))

    @property
    def position_params(self) -> int:
        """GPT's learned position table; Llama's positions are rotary."""
        return 0 if self.llama else self.block_size * self.n_embd

    def kv_rows(self, tp: int) -> tuple[int, int]:
        """(rows of the key/value weight a tp rank holds, of them the rows it multiplies): Llama's ``attn.kv``
        is split by kv head when tp divides ``n_kv_head``, else whole on every rank, each using one head."""
        full = 2 * self.kv_heads * self.head_dim
        if not self.llama or self.kv_heads % tp == 0:
            return full // tp, full // tp
        return full, 2 * self.head_dim

    def tp_error(self, tp: int) -> str | None:
        """Why ``tensor_parallel_size=tp`` cannot split this model (as ``check_layout``), or ``None``."""
        if self.n_head % tp:
            return f"tensor_parallel_size={tp} does not divide n_head={self.n_head}"
        if self.llama and self.kv_heads % tp and tp % self.kv_heads:
            return f"n_kv_head={self.kv_heads} and tensor_parallel_size={tp} neither divides the other"
        if self.llama and self.ffn % tp:
            return f"tensor_parallel_size={tp} does not divide the padded intermediate_size {self.ffn}"
        return None

    @property
    def moe_layers(self) -> list[int]:
        if not self.num_experts:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_layer_freq == 0]

    def padded_vocab(self, tp: int) -> int:
        multiple = math.lcm(self.pad_vocab_size_multiple, tp)
        return -(-self.vocab_size // multiple) * multiple

    def flops_per_token(self, seq_len: int) -> float:
        """``flops_per_token`` of the module: 6 x matmul parameters (active experts, router, head) + attention.

        Llama counts its real ``intermediate_size`` (the padded units multiply zeros)."""
        h, moe = self.n_embd, len(self.moe_layers)
        if self.llama:
            assert self.intermediate_size is not None
            attn = 2 * h * h + 2 * h * self.kv_heads * self.head_dim
            mlp = 3 * h * self.intermediate_size
        else:
            attn, mlp = 4 * h * h, 8 * h * h
        matmul = (
            self.n_layer * attn
            + (self.n_layer - moe) * mlp
            + moe * (self.moe_top_k * mlp + h * self.num_experts)
            + self.vocab_size * h
        )
        return 6.0 * matmul + 12.0 * self.n_layer * seq_len * h

    def num_parameters(self) -> int:
        """Parameters of the one-process model (tied embedding counted once, padded vocabulary and MLP)."""
        h, b, norm = self.n_embd, int(self.bias), self.norm_params
        if self.llama:
            attn = norm + 2 * h * h + self.kv_rows(1)[0] * h
            expert = 3 * h * self.ffn
        else:
            attn = norm + 3 * h * h + 3 * h * b + h * h + h * b
            expert = 8 * h * h + 5 * h * b
        mlp = norm + expert
        moe = norm + self.num_experts * expert + self.num_experts * h
        layers = sum(attn + (moe if i in self.moe_layers else mlp) for i in range(self.n_layer))
        vocab = self.padded_vocab(1) * h
        return layers + vocab * (1 if self.tie_embeddings else 2) + self.position_params + norm

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- where a spec comes from ---------------------------------------------------------------------
    @classmethod
    def from_any(cls, model: Any) -> ModelSpec:
        """A spec from a ``ModelSpec``, a GPT or Llama LightningModule, a ``GPTConfig`` / ``LlamaConfig``, a
        dict of GPT or Llama arguments, or a path: a ``lightning-par fit`` YAML config (its ``model``) or a
        Hugging Face ``config.json`` (GPT-2, or Llama / Mistral / Mixtral)."""
        if isinstance(model, ModelSpec):
            return model
        if isinstance(model, (str, Path)):
            return cls.from_file(model)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "n_layer"):
            model = config
        if isinstance(model, dict):
            return cls.from_dict(model)
        if hasattr(model, "n_layer") and hasattr(model, "n_embd"):
            values = {f.name: getattr(model, f.name) for f in fields(cls) if hasattr(model, f.name)}
            if hasattr(model, "n_kv_head"):  # a LlamaConfig
                values.update(family="llama", bias=False)
            return cls.from_dict(values)
        raise TypeError(
            f"cannot read a model shape from {type(model).__name__}: give a ModelSpec, a GPT or Llama module "
            f"or config, a dict of their arguments, or the path of a YAML config or a Hugging Face config.json."
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """GPT or Llama argument names, or Hugging Face names (``num_hidden_layers``, ``hidden_size``, ...;
        ``model_type`` llama, mistral or mixtral, or Llama's own arguments, plan a Llama)."""
        aliases = {
            "num_hidden_layers": "n_layer",
            "hidden_size": "n_embd",
            "num_attention_heads": "n_head",
            "num_key_value_heads": "n_kv_head",
            "max_position_embeddings": "block_size",
            "n_positions": "block_size",
            "tie_word_embeddings": "tie_embeddings",
            "num_local_experts": "num_experts",
            "num_experts_per_tok": "moe_top_k",
        }
        model_type = values.get("model_type")
        llama = values.get("family") == "llama" or model_type in LLAMA_TYPES
        if model_type is None and "family" not in values:
            llama = any(k in values for k in ("n_kv_head", "num_key_value_heads", "intermediate_size"))
        names = {f.name for f in fields(cls)}
        if not llama:
            names -= {"intermediate_size", "n_kv_head", "pad_intermediate_size_multiple"}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            key = aliases.get(key, key)
            if key in names and value is not None:
                kwargs[key] = value
        if llama:
            if model_type is None and "family" not in values:  # Llama's arguments: its defaults
                kwargs = {**LLAMA_DEFAULTS, **kwargs}
            kwargs.update(family="llama", bias=False)
            kwargs.setdefault("tie_embeddings", False)  # (Llama's and Hugging Face Llama's default)
            if kwargs.get("num_experts"):
                kwargs["moe_layer_freq"] = 1  # (every Llama MoE layer is one: Mixtral)
        if values.get("num_local_experts"):
            kwargs.setdefault("moe_layer_freq", 1)  # (Mixtral: every layer a mixture of experts)
        missing = [n for n in ("n_layer", "n_embd", "n_head", "vocab_size") if n not in kwargs]
        if missing:
            raise ValueError(
                f"the model description lacks {missing}; give them (GPT names n_layer, n_embd, n_head, "
                f"vocab_size or Hugging Face names num_hidden_layers, hidden_size, num_attention_heads, vocab_size)."
            )
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"model file {str(path)!r} does not exist; give a YAML config or a config.json."
            )
        if path.is_dir():
            path = path / "config.json"
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_dict(json.loads(text))
        import yaml

        doc = yaml.safe_load(text) or {}
        model = doc.get("model", doc)
        args = dict(model.get("init_args", model)) if isinstance(model, dict) else {}
        class_path = str(model.get("class_path", "")) if isinstance(model, dict) else ""
        llama = class_path.rsplit(".", 1)[-1] in ("Llama", "Mistral", "Mixtral")
        args.pop("class_path", None)
        data = doc.get("data", {}) or {}
        data_args = data.get("init_args", data) if isinstance(data, dict) else {}
        if "vocab_size" not in args and isinstance(data_args, dict):
            # The CLI links the data module's tokenizer vocabulary; the embedded corpus uses 4096 by default.
            args["vocab_size"] = data_args.get("vocab_size", 4096)
        if llama:
            if "max_position_embeddings" in args:
                args["block_size"] = args.pop("max_position_embeddings")
            return cls.from_dict({**LLAMA_DEFAULTS, **args, "family": "llama"})
        if "block_size" not in args and isinstance(data_args, dict) and "block_size" in data_args:
            args["block_size"] = data_args["block_size"]
        defaults = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}
        return cls.from_dict({**defaults, **args})


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
