"""Hugging Face BERT checkpoints <-> :class:`lightning_par.models.BERT` / ``BERTClassifier``, local files only.

Loading: :func:`bert_config_kwargs` turns ``config.json`` into constructor kwargs (rejecting BERT variants
our network does not compute); :func:`bert_weight_source` gives ``source(our_name, global_shape)`` for
:func:`lightning_par.models.gpt.fill_parameters`, which keeps only this rank's shard. Tensors are read one
at a time from memory-mapped safetensors (pickled ``pytorch_model.bin`` files are refused, never
unpickled; the file lookup is shared with the GPT-2 loader in ``hf.py``).

Saving: :func:`bert_state_dict_to_hf` is the inverse conversion, :func:`save_bert_hf` writes a directory
that ``BertForMaskedLM`` / ``BertForSequenceClassification.from_pretrained`` load, :func:`export_bert`
does it for a single-process model.

Layout differences handled here: HF has separate ``query``/``key``/``value`` linears, our fused ``qkv``
rows are ``[head, (q, k, v), head_dim]`` (a row split over tp gives whole heads); our vocabulary (word
embedding, MLM decoder bias) is padded with zero rows; the MLM decoder weight is the word embedding.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_par.models.hf import CheckpointKeyError, _read_config, _safetensors_key_map
from lightning_par.models.hf_export import save_hf_directory
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.models.bert import BERTConfig, BERTNetwork

__all__ = ["bert_config_kwargs", "bert_state_dict_to_hf", "bert_weight_source", "export_bert", "save_bert_hf"]

_LAYER_MAP: dict[str, str] = {  # ours inside layers.{i} -> HF inside bert.encoder.layer.{i}
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ln_1.weight": "attention.output.LayerNorm.weight",
    "ln_1.bias": "attention.output.LayerNorm.bias",
    "mlp.fc.weight": "intermediate.dense.weight",
    "mlp.fc.bias": "intermediate.dense.bias",
    "mlp.proj.weight": "output.dense.weight",
    "mlp.proj.bias": "output.dense.bias",
    "ln_2.weight": "output.LayerNorm.weight",
    "ln_2.bias": "output.LayerNorm.bias",
}
_TOP_MAP: dict[str, str] = {
    "embed.wte.weight": "bert.embeddings.word_embeddings.weight",
    "embed.wpe.weight": "bert.embeddings.position_embeddings.weight",
    "embed.tte.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed.ln.weight": "bert.embeddings.LayerNorm.weight",
    "embed.ln.bias": "bert.embeddings.LayerNorm.bias",
    # masked LM
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "head.decoder.weight": "bert.embeddings.word_embeddings.weight",  # tied
    "head.decoder.bias": "cls.predictions.bias",
    # classification
    "head.pooler.weight": "bert.pooler.dense.weight",
    "head.pooler.bias": "bert.pooler.dense.bias",
    "head.classifier.weight": "classifier.weight",
    "head.classifier.bias": "classifier.bias",
}
_VOCAB_ROWS = ("embed.wte.weight", "head.decoder.weight", "head.decoder.bias")


def _hf_keys(our_name: str) -> list[str]:
    """The HF tensors one of our parameters is made of (three for the fused q/k/v)."""
    if our_name in _TOP_MAP:
        return [_TOP_MAP[our_name]]
    parts = our_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        prefix = f"bert.encoder.layer.{parts[1]}."
        if parts[2] in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = parts[2].rsplit(".", 1)[1]
            return [f"{prefix}attention.self.{p}.{kind}" for p in ("query", "key", "value")]
        if parts[2] in _LAYER_MAP:
            return [prefix + _LAYER_MAP[parts[2]]]
    raise CheckpointKeyError(f"parameter {our_name!r} has no counterpart in a Hugging Face BERT checkpoint.")


def bert_config_kwargs(path: str | os.PathLike, task: str) -> dict[str, Any]:
    """``BERT`` (``task="mlm"``) or ``BERTClassifier`` (``"classification"``) kwargs from ``config.json``.

    Our model has one dropout rate, taken from ``hidden_dropout_prob``. Raises ``ValueError`` for
    checkpoints that are not BERT or that our network does not compute.
    """
    config = _read_config(path)
    where = f"in {str(path)!r}"
    if config.get("model_type") != "bert":
        raise ValueError(
            f"{str(path)!r} holds a {config.get('model_type')!r} checkpoint; only 'bert' is supported."
        )
    checks = {
        "hidden_act": (config.get("hidden_act", "gelu"), ("gelu",), "our MLP uses the exact (erf) GELU"),
        "position_embedding_type": (
            config.get("position_embedding_type", "absolute"),
            ("absolute",),
            "our positions are learned absolute embeddings",
        ),
        "is_decoder": (config.get("is_decoder", False), (False,), "BERT here is an encoder"),
        "add_cross_attention": (config.get("add_cross_attention", False), (False,), "no cross-attention"),
    }
    for name, (value, valid, why) in checks.items():
        if value not in valid:
            raise ValueError(f"{name}={value!r} {where} is not supported ({why}); valid: {list(valid)}.")
    kwargs: dict[str, Any] = {
        "vocab_size": int(config["vocab_size"]),
        "n_layer": int(config["num_hidden_layers"]),
        "n_head": int(config["num_attention_heads"]),
        "n_embd": int(config["hidden_size"]),
        "intermediate_size": int(config["intermediate_size"]),
        "max_position_embeddings": int(config["max_position_embeddings"]),
        "type_vocab_size": int(config.get("type_vocab_size", 2)),
        "dropout": float(config.get("hidden_dropout_prob", 0.1)),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
    }
    if task == "classification":
        problem = config.get("problem_type")
        if problem not in (None, "single_label_classification", "regression"):
            raise ValueError(
                f"problem_type={problem!r} {where} is not supported; valid: "
                f"['single_label_classification', 'regression'] (or unset)."
            )
        labels = config.get("id2label")
        kwargs["num_labels"] = int(config.get("num_labels", len(labels) if labels else 2))
    elif task != "mlm":
        raise ValueError(f"task={task!r} is not valid; valid: ['mlm', 'classification'].")
    return kwargs


def _to_ours(name: str, tensors: list[Tensor], cfg: BERTConfig, shape: torch.Size) -> Tensor:
    if len(tensors) == 3:  # q, k, v: each [C, C] (rows: head, dim) or [C] -> rows (head, q|k|v, dim)
        hd = cfg.n_embd // cfg.n_head
        stacked = torch.stack(tensors).reshape(3, cfg.n_head, hd, *tensors[0].shape[1:])
        return stacked.transpose(0, 1).reshape(shape).contiguous()
    (tensor,) = tensors
    if name in _VOCAB_ROWS:
        full = tensor.new_zeros(shape)
        full[: cfg.vocab_size] = tensor
        return full
    return tensor


def bert_weight_source(path: str | os.PathLike, network: BERTNetwork) -> Callable[..., Tensor]:
    """``source(our_name, global_shape, shard=None)``: one of our parameters from a HF BERT directory.

    The whole tensor is returned (``fill_parameters`` keeps this rank's slice); the checkpoint's shape
    (vocabulary, layers, heads, widths, positions, token types, labels) must match ``network.cfg``.
    """
    from safetensors import safe_open

    directory = Path(path)
    cfg = network.cfg
    task = "mlm" if cfg.num_labels is None else "classification"
    hf = bert_config_kwargs(directory, task)
    ours = {k: getattr(cfg, k) for k in hf if k not in ("dropout", "layer_norm_eps")}
    ours["intermediate_size"] = cfg.mlp_hidden
    differ = [f"{k}: checkpoint {hf[k]}, model {v}" for k, v in ours.items() if hf[k] != v]
    if differ:
        raise ValueError(
            f"the model does not have the shape of the checkpoint in {str(directory)!r}: " + "; ".join(differ)
        )
    key_map = _safetensors_key_map(directory)

    def read(key: str, name: str) -> Tensor:
        if key not in key_map and key.startswith("bert.") and key[len("bert.") :] in key_map:
            key = key[len("bert.") :]  # a bare BertModel checkpoint
        if key == "cls.predictions.bias" and key not in key_map:
            key = "cls.predictions.decoder.bias"
        file = key_map.get(key)
        if file is None:
            raise CheckpointKeyError(
                f"tensor {key!r} (for parameter {name!r}) is missing from the checkpoint in {str(directory)!r}."
            )
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)

    def source(name: str, shape: torch.Size, shard: tuple[int, int, int] | None = None) -> Tensor:
        shape = torch.Size(shape)
        tensors = [read(key, name) for key in _hf_keys(name)]
        expected = list(shape)
        if name in _VOCAB_ROWS:
            expected[0] = cfg.vocab_size
        if len(tensors) == 3:
            expected[0] //= 3
        for t in tensors:
            if list(t.shape) != expected:
                raise CheckpointKeyError(
                    f"shape mismatch for parameter {name!r}: expected {expected} in the checkpoint "
                    f"(our shape {list(shape)}), got {list(t.shape)}."
                )
        return _to_ours(name, tensors, cfg, shape)

    return source


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------


def bert_state_dict_to_hf(our_state: dict[str, Tensor], cfg: BERTConfig) -> dict[str, Tensor]:
    """Our full (unsharded) state dict -> HF tensors (``bert.*``, ``cls.*`` or ``classifier.*``).

    Accepts the network's keys or the LightningModule's (``model.``-prefixed). Padded vocabulary rows are
    dropped; the tied decoder weight is not written (HF ties it on load).
    """
    from torch.distributed.tensor import DTensor

    if any(k.startswith("model.") for k in our_state):
        our_state = {k[len("model.") :]: v for k, v in our_state.items() if k.startswith("model.")}
    out: dict[str, Tensor] = {}
    for name, tensor in our_state.items():
        if name == "head.decoder.weight":
            continue
        if isinstance(tensor, DTensor):
            raise TypeError(
                f"{name!r} is a sharded DTensor: gather a full state dict first, or use one process."
            )
        keys = _hf_keys(name)
        tensor = tensor.detach().to("cpu")
        if name in _VOCAB_ROWS:
            tensor = tensor[: cfg.vocab_size]
        if len(keys) == 3:
            hd = cfg.n_embd // cfg.n_head
            parts = tensor.reshape(cfg.n_head, 3, hd, *tensor.shape[1:]).transpose(0, 1)
            for key, part in zip(keys, parts, strict=True):
                out[key] = part.reshape(cfg.n_embd, *tensor.shape[1:]).contiguous().clone()
        else:
            out[keys[0]] = tensor.contiguous().clone()
    return out


def save_bert_hf(our_full_state_dict: dict[str, Tensor], cfg: BERTConfig, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``BertForMaskedLM`` or ``BertForSequenceClassification``."""
    from transformers import BertConfig

    tensors = bert_state_dict_to_hf(our_full_state_dict, cfg)
    extra: dict[str, Any] = {}
    if cfg.num_labels is None:
        extra["architectures"] = ["BertForMaskedLM"]
    else:
        extra["architectures"] = ["BertForSequenceClassification"]
        extra["num_labels"] = cfg.num_labels
        extra["problem_type"] = "regression" if cfg.num_labels == 1 else "single_label_classification"
    hf_config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.mlp_hidden,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=None,  # our embedding has no frozen padding row
        tie_word_embeddings=True,
        dtype=str(tensors["bert.embeddings.word_embeddings.weight"].dtype).removeprefix("torch."),
        **extra,
    )
    return save_hf_directory(hf_config, tensors, out_dir)


def export_bert(model: Any, out_dir: str | os.PathLike) -> Path:
    """Save a single-process ``BERT`` / ``BERTClassifier`` (plain tensors) as a Hugging Face directory."""
    if model.model is None:
        raise RuntimeError("call configure_model() before export: the model has no network yet.")
    return save_bert_hf(model.model.state_dict(), model.config, out_dir)


def export_bert_checkpoint(
    hparams: dict[str, Any], saved: Any, load: Callable[[dict[str, Tensor]], None], out_dir: str | os.PathLike
) -> Path:
    """``lightning-par export-hf`` for a BERT checkpoint: rebuild the model whole, ``load`` its state, save.

    ``saved`` is the checkpoint's tensor metadata (names and sizes: the task and the padded vocabulary);
    ``load(state_dict)`` fills the given whole tensors from the checkpoint.
    """
    import inspect

    from lightning_par.models.bert import BERTNetwork
    from lightning_par.models.bert_tasks import BERT, BERTClassifier

    cls = BERTClassifier if "model.head.classifier.weight" in saved else BERT
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "hf_checkpoint"}
    model = cls(**{k: v for k, v in hparams.items() if k in accepted})
    model.model = BERTNetwork(model.config, int(saved["model.embed.wte.weight"].size[0]))
    state = model.state_dict()
    load(state)
    return export_bert(model, out_dir)
