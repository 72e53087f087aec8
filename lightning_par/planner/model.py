"""The shape of the model a layout is planned for, from a GPT module, its config, a YAML or HF file, or flags.

Everything the cost model needs is here, counted the way the code builds the network: the vocabulary
padded to a multiple of 64 and of tp (``GPTConfig.padded_vocab_size``), learned positions for
``block_size`` tokens, pre-norm blocks whose halves (attention, MLP) a pipeline stage may cut between, and
mixture-of-experts MLPs on every ``moe_layer_freq``-th block.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-style decoder as :class:`lightning_par.models.GPT` builds it."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int = 2048
    bias: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 64
    num_experts: int = 0
    moe_top_k: int = 2
    moe_layer_freq: int = 2

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; valid n_head: "
                f"{[d for d in range(1, min(self.n_embd, 256) + 1) if self.n_embd % d == 0]}."
            )
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} is not valid: it must be 0 (dense) or >= 1.")

    @property
    def moe_layers(self) -> list[int]:
        if not self.num_experts:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_layer_freq == 0]

    def padded_vocab(self, tp: int) -> int:
        multiple = math.lcm(self.pad_vocab_size_multiple, tp)
        return -(-self.vocab_size // multiple) * multiple

    def flops_per_token(self, seq_len: int) -> float:
        """``GPT.flops_per_token``: 6 x matmul parameters (active experts, router, head) + attention."""
        h, moe = self.n_embd, len(self.moe_layers)
        mlp = 8 * h * h
        matmul = (
            self.n_layer * 4 * h * h
            + (self.n_layer - moe) * mlp
            + moe * (self.moe_top_k * mlp + h * self.num_experts)
            + self.vocab_size * h
        )
        return 6.0 * matmul + 12.0 * self.n_layer * seq_len * h

    def num_parameters(self) -> int:
        """Parameters of the one-process model (tied embedding counted once, padded vocabulary)."""
        h, b = self.n_embd, int(self.bias)
        norm = h * (1 + b)
        attn = norm + 3 * h * h + 3 * h * b + h * h + h * b
        mlp = norm + 8 * h * h + 5 * h * b
        moe = norm + self.num_experts * (8 * h * h + 5 * h * b) + self.num_experts * h
        layers = sum(attn + (moe if i in self.moe_layers else mlp) for i in range(self.n_layer))
        vocab = self.padded_vocab(1) * h
        return layers + vocab * (1 if self.tie_embeddings else 2) + self.block_size * h + norm

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- where a spec comes from ---------------------------------------------------------------------
    @classmethod
    def from_any(cls, model: Any) -> ModelSpec:
        """A spec from a ``ModelSpec``, a GPT LightningModule, a ``GPTConfig``, a dict of GPT arguments,
        or a path: a ``lightning-par fit`` YAML config (its ``model.init_args``) or a Hugging Face
        ``config.json`` (GPT-2 or Llama-style names)."""
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
            return cls.from_dict(
                {f.name: getattr(model, f.name) for f in fields(cls) if hasattr(model, f.name)}
            )
        raise TypeError(
            f"cannot read a model shape from {type(model).__name__}: give a ModelSpec, a GPT module or "
            f"GPTConfig, a dict of GPT arguments, or the path of a YAML config or a Hugging Face config.json."
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """GPT argument names, or Hugging Face names (``num_hidden_layers``, ``hidden_size``, ...)."""
        aliases = {
            "num_hidden_layers": "n_layer",
            "hidden_size": "n_embd",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "block_size",
            "n_positions": "block_size",
            "tie_word_embeddings": "tie_embeddings",
            "num_local_experts": "num_experts",
            "num_experts_per_tok": "moe_top_k",
        }
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            key = aliases.get(key, key)
            if key in names and value is not None:
                kwargs[key] = value
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
        data = doc.get("data", {}) or {}
        data_args = data.get("init_args", data) if isinstance(data, dict) else {}
        if "vocab_size" not in args and isinstance(data_args, dict):
            # The CLI links the data module's tokenizer vocabulary; the embedded corpus uses 4096 by default.
            args["vocab_size"] = data_args.get("vocab_size", 4096)
        if "block_size" not in args and isinstance(data_args, dict) and "block_size" in data_args:
            args["block_size"] = data_args["block_size"]
        defaults = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}
        return cls.from_dict({**defaults, **args})
