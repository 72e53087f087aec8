"""Hugging Face Llama / Mistral / Mixtral checkpoints -> :class:`lightning_par.models.llama.Llama`, local
files only, each rank reading only its slices.

* :func:`llama_config_kwargs` turns ``config.json`` (``model_type`` llama, mistral or mixtral) into
  ``Llama`` kwargs and refuses, by name, what the network does not compute: a sliding window, rotary
  scaling other than the default, partial rotary, attention or MLP biases, an activation other than
  SiLU, a ``head_dim`` other than ``hidden_size / num_attention_heads``, attention dropout, router jitter.
* :func:`llama_weight_source` is the ``source(name, shape, shard)`` of
  :func:`lightning_par.initialization.fill_parameters`: every tensor is read from memory-mapped
  safetensors, and with a ``shard`` only that slice (rows of ``q``, of the interleaved ``kv``, of the
  vocabulary, of an expert inside a fused tensor; columns of ``o_proj`` / ``down_proj``).

Layout differences handled here (saving: :mod:`lightning_par.models.hf_llama_export`):

* ``attn.kv`` rows are ``[kv head, (k|v), head_dim]``: Hugging Face's ``k_proj`` and ``v_proj``
  interleaved head by head, so a row split gives each tp rank whole kv heads with their values;
* Mixtral experts come either one tensor per expert (``block_sparse_moe.experts.{e}.w1/w2/w3``, the
  published checkpoints) or fused (``mlp.experts.gate_up_proj`` ``[E, 2I, C]`` and ``down_proj``
  ``[E, C, I]``, transformers 5's in-memory layout); ``w1`` is our expert's ``gate``, ``w3`` its ``up``,
  ``w2`` its ``proj``;
* our vocabulary is padded with zero rows to ``cfg.padded_vocab_size(tp)``, and our MLP width (gate
  and up rows, ``proj`` columns, dense and per expert) with zeros to ``cfg.padded_intermediate_size``: a
  rank whose slice reaches into the padding reads only the real part and gets zeros for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_par.models.hf import CheckpointKeyError, _read_config, _safetensors_dtype, _safetensors_key_map
from lightning_par.models.llama_network import mlp_width_dim
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.models.llama_network import LlamaConfig, LlamaNetwork

_DEFAULT_THETA = {"llama": 10000.0, "mistral": 10000.0, "mixtral": 1000000.0}
_DEFAULT_EPS = {"llama": 1e-6, "mistral": 1e-6, "mixtral": 1e-5}
_DEFAULT_WINDOW = {"llama": None, "mistral": 4096, "mixtral": None}  # MistralConfig's default is 4096
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)

# Our parameter name inside a layer -> the Hugging Face name inside ``layers.{i}`` (one tensor each).
LAYER_KEYS: dict[str, str] = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "mlp.router.gate.weight": "block_sparse_moe.gate.weight",
}
KV_KEYS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")
EXPERT_KEYS = {"gate": "w1", "up": "w3", "proj": "w2"}
"""Our expert linear -> Mixtral's per-expert tensor (``block_sparse_moe.experts.{e}.{w}.weight``)."""


def _validated_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json with the family's defaults, checked for what our network computes."""
    raw = _read_config(path)
    kind = raw.get("model_type")
    if kind not in _DEFAULT_THETA:
        raise ValueError(
            f"{str(path)!r} holds a {kind!r} checkpoint (config.json model_type); Llama.from_hf reads "
            f"{sorted(_DEFAULT_THETA)}."
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"config.json in {str(path)!r} lacks {missing}.")
    c = dict(raw)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    n_head, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
    problems = []
    window = c.get("sliding_window", _DEFAULT_WINDOW[kind])
    if window is not None:
        problems.append(
            f"sliding_window={window} (attention here is full causal attention; a {kind} checkpoint "
            "without a window has sliding_window null)"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_scaling type {rope_type!r} (only the default rotary embedding is implemented)")
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial} (rotary positions cover the whole head)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            problems.append(f"{flag}=True (the network has no biases)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (the MLP is SwiGLU: 'silu')")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * n_head != hidden:
        problems.append(
            f"head_dim={head_dim} (it must be hidden_size / num_attention_heads = {hidden // n_head})"
        )
    if c.get("attention_dropout"):
        problems.append(f"attention_dropout={c['attention_dropout']} (the network has no dropout)")
    if c.get("router_jitter_noise"):
        problems.append(
            f"router_jitter_noise={c['router_jitter_noise']} (Mixtral's jitter also scales the experts' input)"
        )
    if problems:
        raise ValueError(f"{str(path)!r} uses what Llama does not compute: " + "; ".join(problems) + ".")
    c["rope_theta"] = float(rope.get("rope_theta", c.get("rope_theta", _DEFAULT_THETA[kind])))
    c.setdefault("rms_norm_eps", _DEFAULT_EPS[kind])
    c["num_key_value_heads"] = c.get("num_key_value_heads") or n_head
    return c


def llama_config_kwargs(path: str | os.PathLike) -> dict[str, Any]:
    """``Llama`` constructor kwargs from a local Llama, Mistral or Mixtral directory's ``config.json``.

    Raises ``FileNotFoundError`` for a missing directory or config.json, ``ValueError`` for another model
    type or a feature the network does not compute (all of them named).
    """
    c = _validated_config(path)
    kwargs: dict[str, Any] = {
        "vocab_size": int(c["vocab_size"]),
        "n_layer": int(c["num_hidden_layers"]),
        "n_head": int(c["num_attention_heads"]),
        "n_kv_head": int(c["num_key_value_heads"]),
        "n_embd": int(c["hidden_size"]),
        "intermediate_size": int(c["intermediate_size"]),
        "rope_theta": c["rope_theta"],
        "rms_norm_eps": float(c["rms_norm_eps"]),
        "max_position_embeddings": int(c["max_position_embeddings"]),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
    }
    if c["model_type"] == "mixtral":
        kwargs["num_experts"] = int(c.get("num_local_experts", 8))
        kwargs["moe_top_k"] = int(c.get("num_experts_per_tok", 2))
        kwargs["moe_aux_loss_coef"] = float(c.get("router_aux_loss_coef", 0.001))
    return kwargs


def _window(sliced: Any, lead: tuple[int, ...], row0: int, shape: torch.Size, shard: Any) -> Tensor:
    """Our tensor is ``hf[lead][row0 : row0 + shape[0]]``; read it, or only its ``shard``, from disk."""
    index = [slice(i, i + 1) for i in lead] + [slice(row0, row0 + shape[0])]
    index += [slice(None)] * (len(shape) - 1)
    if shard is not None:
        dim, start, stop = shard
        base = index[len(lead) + dim]
        offset = base.start or 0
        index[len(lead) + dim] = slice(offset + start, offset + stop)
    part = sliced[tuple(index)]
    return part.reshape(part.shape[len(lead) :]).contiguous()


def _padded_window(
    sliced: Any, lead: tuple[int, ...], row0: int, shape: torch.Size, shard: Any, dim: int, real: int
) -> Tensor:
    """Like :func:`_window` for a tensor whose ``dim`` is zero-padded from ``real`` to ``shape[dim]``:
    only the real part of the requested slice is read, the padded part is zeros."""
    start, stop = (shard[1], shard[2]) if shard is not None and shard[0] == dim else (0, shape[dim])
    out_shape = list(shape)
    if shard is not None:
        out_shape[shard[0]] = shard[2] - shard[1]
    out = torch.zeros(out_shape, dtype=_safetensors_dtype(sliced))
    count = min(stop, real) - start
    if count > 0:
        unpadded = list(shape)
        unpadded[dim] = real
        inner = (dim, start, start + count) if shard is None or shard[0] == dim else shard
        out.narrow(dim, 0, count).copy_(_window(sliced, lead, row0, torch.Size(unpadded), inner))
    return out


def llama_weight_source(path: str | os.PathLike, network: LlamaNetwork) -> Callable[..., Tensor]:
    """``source(our_name, global_shape, shard=None)``: one of our parameters from a HF directory.

    With ``shard=(dim, start, stop)`` only that slice is read (memory-mapped ``get_slice``); a slice that
    does not fall on whole kv heads is read whole (the caller cuts it). The checkpoint's shape must be the
    network's; a tied checkpoint may be loaded into an untied network (the head starts as a copy of the
    embedding), not the reverse. Keys with the ``model.`` prefix (``*ForCausalLM``) or without
    (``LlamaModel``), and Mixtral experts per expert or fused, are all read.
    """
    from safetensors import safe_open

    directory = Path(path)
    kw = llama_config_kwargs(directory)
    cfg = network.cfg
    ours = {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    ours.update(intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts)
    differ = [f"{k}: checkpoint {kw.get(k)}, model {v}" for k, v in ours.items() if kw.get(k) != v]
    if differ:
        raise ValueError(
            f"the model does not have the shape of the checkpoint in {str(directory)!r}: " + "; ".join(differ)
        )
    tied = kw["tie_word_embeddings"]
    if cfg.tie_word_embeddings and not tied:
        raise ValueError(
            f"the checkpoint in {str(directory)!r} has an untied lm_head (tie_word_embeddings=False) but the "
            "model ties its head to the embedding: construct it with tie_word_embeddings=False."
        )
    key_map = _safetensors_key_map(directory)
    prefix = "model." if any(k.startswith("model.") for k in key_map) else ""
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in key_map)
    D, I = cfg.head_dim, cfg.intermediate_size  # noqa: E741 (Hugging Face's name for the MLP width)

    def open_slice(key: str, name: str, expected: list[int]) -> tuple[Any, Any]:
        """(the open file, the tensor's lazy slice), after checking the tensor's shape."""
        file = key_map.get(key)
        if file is None:
            raise CheckpointKeyError(
                f"tensor {key!r} (for parameter {name!r}) is missing from the checkpoint in {str(directory)!r}."
            )
        handle = safe_open(str(file), framework="pt")
        sliced = handle.get_slice(key)
        got = list(sliced.get_shape())
        if got != expected:
            raise CheckpointKeyError(
                f"shape mismatch for parameter {name!r} (checkpoint tensor {key!r}): expected {expected}, "
                f"got {got}."
            )
        return handle, sliced

    def vocab(key: str, name: str, shape: torch.Size, shard: Any) -> Tensor:
        if shape[0] < cfg.vocab_size:
            raise CheckpointKeyError(f"{name!r} has {shape[0]} rows, fewer than vocab_size={cfg.vocab_size}.")
        handle, sliced = open_slice(key, name, [cfg.vocab_size, *shape[1:]])
        start, stop = (shard[1], shard[2]) if shard is not None and shard[0] == 0 else (0, shape[0])
        part = torch.zeros((stop - start, *shape[1:]), dtype=_safetensors_dtype(sliced))
        real_stop = min(stop, cfg.vocab_size)
        if real_stop > start:
            part[: real_stop - start] = sliced[start:real_stop]
        return part

    def kv(layer: str, name: str, shape: torch.Size, shard: Any) -> Tensor:
        opened = [open_slice(f"{layer}{key}", name, [cfg.n_kv_head * D, cfg.n_embd]) for key in KV_KEYS]
        g0, g1, cols = 0, cfg.n_kv_head, slice(None)
        if shard is not None and shard[0] == 0 and shard[1] % (2 * D) == 0 and shard[2] % (2 * D) == 0:
            g0, g1 = shard[1] // (2 * D), shard[2] // (2 * D)
        elif shard is not None and shard[0] == 1:
            cols = slice(shard[1], shard[2])
        k, v = (sliced[g0 * D : g1 * D, cols].view(g1 - g0, D, -1) for _, sliced in opened)
        return torch.stack([k, v], dim=1).reshape(2 * (g1 - g0) * D, -1)

    def source(name: str, shape: torch.Size, shard: tuple[int, int, int] | None = None) -> Tensor:
        shape = torch.Size(shape)
        if name == "embed.wte.weight":
            return vocab(f"{prefix}embed_tokens.weight", name, shape, shard)
        if name == "head.weight":
            key = f"{prefix}embed_tokens.weight" if tied else "lm_head.weight"
            return vocab(key, name, shape, shard)
        if name == "norm.weight":
            handle, sliced = open_slice(f"{prefix}norm.weight", name, list(shape))
            return _window(sliced, (), 0, shape, shard)
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
            raise CheckpointKeyError(f"parameter {name!r} has no counterpart in a Llama checkpoint.")
        layer, inner = f"{prefix}layers.{parts[1]}.", parts[2]
        if inner == "attn.kv.weight":
            return kv(layer, name, shape, shard)
        width_dim = mlp_width_dim(name)
        real = list(shape)
        if width_dim is not None:
            real[width_dim] = I
        lead, row0, expected = (), 0, real
        if inner in LAYER_KEYS:
            key = layer + LAYER_KEYS[inner]
            if fused and inner == "mlp.router.gate.weight":
                key = layer + "mlp.gate.weight"
        elif inner.startswith("mlp.experts.") and inner.count(".") == 4:
            _, _, e, linear, _ = inner.split(".")
            if not fused:
                key = f"{layer}block_sparse_moe.experts.{e}.{EXPERT_KEYS[linear]}.weight"
            elif linear == "proj":
                key, lead, expected = f"{layer}mlp.experts.down_proj", (int(e),), [cfg.num_experts, *real]
            else:
                key, lead, row0 = f"{layer}mlp.experts.gate_up_proj", (int(e),), I if linear == "up" else 0
                expected = [cfg.num_experts, 2 * I, cfg.n_embd]
        else:
            raise CheckpointKeyError(f"parameter {name!r} has no counterpart in a Llama checkpoint.")
        handle, sliced = open_slice(key, name, expected)  # (the handle keeps the file mapped)
        if width_dim is not None:
            if shape[width_dim] < I:
                raise CheckpointKeyError(f"{name!r} has an MLP width of {shape[width_dim]}, less than {I}.")
            return _padded_window(sliced, lead, row0, shape, shard, width_dim, I)
        return _window(sliced, lead, row0, shape, shard)

    return source


def hf_key(name: str, cfg: LlamaConfig) -> str | tuple[str, str]:
    """The ``*ForCausalLM`` key(s) of one of our parameters in the per-expert layout (a pair for ``kv``)."""
    if name == "embed.wte.weight":
        return "model.embed_tokens.weight"
    if name == "head.weight":
        return "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    _, i, inner = name.split(".", 2)
    layer = f"model.layers.{i}."
    if inner == "attn.kv.weight":
        return layer + KV_KEYS[0], layer + KV_KEYS[1]
    if inner in LAYER_KEYS:
        return layer + LAYER_KEYS[inner]
    _, _, e, linear, _ = inner.split(".")
    return f"{layer}block_sparse_moe.experts.{e}.{EXPERT_KEYS[linear]}.weight"
