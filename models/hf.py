"""Hugging Face GPT-2 checkpoints <-> :class:`lightning_par.models.gpt.GPT`, local files only.

Loading (``GPT.from_hf(path)`` then ``configure_model()``):

* :func:`gpt2_config_kwargs` turns the directory's ``config.json`` into ``GPT`` constructor kwargs and
  rejects the GPT-2 variants our network does not compute (other activations, layer-index attention
  scaling, reordered/upcast attention, cross-attention, a non-standard MLP width).
* :func:`gpt2_weight_source` returns ``source(our_name, global_shape) -> full tensor`` for
  :func:`lightning_par.models.gpt.fill_parameters`, which shards each tensor as soon as it is produced.
  Tensors are read one at a time from memory-mapped safetensors files (single file or sharded with
  ``model.safetensors.index.json``); pickled ``pytorch_model.bin`` checkpoints are refused, never
  unpickled.

Saving: :func:`gpt2_state_dict_to_hf` is the inverse conversion, :func:`save_gpt2_hf` writes a directory
that ``transformers.GPT2LMHeadModel.from_pretrained`` loads, :func:`export_gpt2` does it for a
single-process :class:`GPT`.

Layout differences handled here:

* HF uses ``Conv1D`` (weights ``[in, out]``); we use ``nn.Linear`` (``[out, in]``): transpose.
* HF's ``c_attn`` output columns are ``[q | k | v]``, each ``[n_head, head_dim]``; our fused ``qkv`` rows
  are ``[n_head, (q, k, v), head_dim]`` so that a row split over tensor-parallel ranks gives whole heads.
* Our vocabulary is padded with zero rows to ``cfg.padded_vocab_size(tp)``; HF's is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.models.gpt import GPTConfig, GPTNetwork

__all__ = [
    "CheckpointKeyError",
    "gpt2_config_kwargs",
    "gpt2_weight_source",
]

# Activations equal to our MLP's GELU (tanh approximation): "gelu_new" is GPT-2's own, written out in
# Python; "gelu_pytorch_tanh" is the same formula computed by torch.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")

# GPT2Config defaults, for keys an older config.json may omit.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# Our parameter name inside a layer -> (HF name inside ``h.{i}``, conversion).
_LAYER_MAP: dict[str, tuple[str, str]] = {
    "ln_1.weight": ("ln_1.weight", "copy"),
    "ln_1.bias": ("ln_1.bias", "copy"),
    "attn.qkv.weight": ("attn.c_attn.weight", "qkv_weight"),
    "attn.qkv.bias": ("attn.c_attn.bias", "qkv_bias"),
    "attn.proj.weight": ("attn.c_proj.weight", "transpose"),
    "attn.proj.bias": ("attn.c_proj.bias", "copy"),
    "ln_2.weight": ("ln_2.weight", "copy"),
    "ln_2.bias": ("ln_2.bias", "copy"),
    "mlp.fc.weight": ("mlp.c_fc.weight", "transpose"),
    "mlp.fc.bias": ("mlp.c_fc.bias", "copy"),
    "mlp.proj.weight": ("mlp.c_proj.weight", "transpose"),
    "mlp.proj.bias": ("mlp.c_proj.bias", "copy"),
}
_TOP_MAP: dict[str, tuple[str, str]] = {
    "embed.wte.weight": ("wte.weight", "vocab"),
    "embed.wpe.weight": ("wpe.weight", "copy"),
    "norm.weight": ("ln_f.weight", "copy"),
    "norm.bias": ("ln_f.bias", "copy"),
}


class CheckpointKeyError(KeyError, ValueError):
    """A checkpoint lacks a tensor, or holds one of the wrong shape (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Hugging Face checkpoint directory {str(directory)!r} does not exist (or is not a directory); "
            "pass a local directory holding config.json and model.safetensors (nothing is downloaded)."
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{str(config_file)!r} not found: a Hugging Face checkpoint directory needs config.json."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} does not hold a JSON object.")
    return config


def _validated_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json with GPT2Config defaults filled in, checked for what our network can compute."""
    raw = _read_config(path)
    model_type = raw.get("model_type")
    if model_type != "gpt2":
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} checkpoint (config.json model_type); only 'gpt2' is supported."
        )
    config = {**_HF_DEFAULTS, **raw}
    act = config["activation_function"]
    if act not in _TANH_GELU:
        raise ValueError(
            f"activation_function={act!r} in {str(path)!r} is not supported: our GPT MLP uses the tanh-approximated "
            f"GELU, which is GPT-2's 'gelu_new' (accepted: {list(_TANH_GELU)})."
        )
    if config["scale_attn_by_inverse_layer_idx"]:
        raise ValueError(
            f"scale_attn_by_inverse_layer_idx=True in {str(path)!r} is not supported: our attention scales "
            "scores by 1/sqrt(head_dim) only, not also by 1/(layer_idx + 1)."
        )
    if config["reorder_and_upcast_attn"]:
        raise ValueError(
            f"reorder_and_upcast_attn=True in {str(path)!r} is not supported: our attention does not use the "
            "reordered/upcast attention computation."
        )
    if not config["scale_attn_weights"]:
        raise ValueError(
            f"scale_attn_weights=False in {str(path)!r} is not supported: our attention always scales scores "
            "by 1/sqrt(head_dim)."
        )
    if config["add_cross_attention"]:
        raise ValueError(
            f"add_cross_attention=True in {str(path)!r} is not supported (decoder-only GPT-2 only)."
        )
    n_inner = config["n_inner"]
    if n_inner is not None and n_inner != 4 * config["n_embd"]:
        raise ValueError(
            f"n_inner={n_inner} in {str(path)!r} is not supported: our MLP width is 4 * n_embd = {4 * config['n_embd']}."
        )
    return config


def gpt2_config_kwargs(path: str | os.PathLike) -> dict[str, Any]:
    """``GPT`` constructor kwargs from a local Hugging Face GPT-2 directory's ``config.json``.

    Our model has one dropout rate; it is taken from ``resid_pdrop`` (``embd_pdrop`` and ``attn_pdrop``
    are not used). Raises ``FileNotFoundError`` for a missing directory or config.json, ``ValueError`` for
    a checkpoint that is not GPT-2 or a GPT-2 variant our network does not compute.
    """
    config = _validated_hf_config(path)
    return {
        "vocab_size": int(config["vocab_size"]),
        "n_layer": int(config["n_layer"]),
        "n_head": int(config["n_head"]),
        "n_embd": int(config["n_embd"]),
        "block_size": int(config["n_positions"]),
        "bias": True,
        "dropout": float(config["resid_pdrop"]),
        "tie_embeddings": bool(config["tie_word_embeddings"]),
        "layer_norm_eps": float(config["layer_norm_epsilon"]),
    }


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _safetensors_key_map(directory: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (header reads only, no tensor data)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no 'weight_map'.")
        key_map = {key: directory / name for key, name in weight_map.items()}
        missing = sorted({str(f) for f in key_map.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{str(index)!r} lists shard files that are missing: {missing}")
        return key_map
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {pickles})" if pickles else ""
        raise FileNotFoundError(
            f"no safetensors weights in {str(directory)!r}{found}: safetensors is required (pickled "
            "pytorch_model.bin checkpoints are never loaded, for safety and memory-mapped reading). Convert it "
            "once with transformers: AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)."
        )
    key_map: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                key_map[key] = file
    return key_map


def _hf_to_ours(tensor: Tensor, conversion: str, n_head: int) -> Tensor:
    if conversion == "transpose":
        return tensor.t()
    if conversion == "qkv_weight":  # [C, 3C] columns (q|k|v, head, dim) -> [3C, C] rows (head, q|k|v, dim)
        c_in, c3 = tensor.shape
        return tensor.t().reshape(3, n_head, c3 // (3 * n_head), c_in).transpose(0, 1).reshape(c3, c_in)
    if conversion == "qkv_bias":
        (c3,) = tensor.shape
        return tensor.reshape(3, n_head, c3 // (3 * n_head)).transpose(0, 1).reshape(c3)
    return tensor


def _ours_to_hf(tensor: Tensor, conversion: str, n_head: int) -> Tensor:
    if conversion == "transpose":
        return tensor.t()
    if conversion == "qkv_weight":  # [3C, C] rows (head, q|k|v, dim) -> [C, 3C] columns (q|k|v, head, dim)
        c3, c_in = tensor.shape
        return tensor.reshape(n_head, 3, c3 // (3 * n_head), c_in).transpose(0, 1).reshape(c3, c_in).t()
    if conversion == "qkv_bias":
        (c3,) = tensor.shape
        return tensor.reshape(n_head, 3, c3 // (3 * n_head)).transpose(0, 1).reshape(c3)
    return tensor


def _hf_key(our_name: str) -> tuple[str, str]:
    """(``GPT2LMHeadModel`` key, conversion) of one of our parameter names."""
    if our_name in _TOP_MAP:
        hf_name, conversion = _TOP_MAP[our_name]
        return "transformer." + hf_name, conversion
    if our_name == "head.weight":
        return "lm_head.weight", "vocab"
    parts = our_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        hf_name, conversion = _LAYER_MAP[parts[2]]
        return f"transformer.h.{parts[1]}.{hf_name}", conversion
    raise CheckpointKeyError(f"parameter {our_name!r} has no counterpart in a Hugging Face GPT-2 checkpoint.")


def _read_shard(
    sliced: Any, conversion: str, shard: tuple[int, int, int], shape: torch.Size, cfg: GPTConfig
) -> Tensor | None:
    """Read only rows ``start:stop`` of dim ``dim`` of our tensor from the checkpoint (memory-mapped slice).

    Returns ``None`` for a slice this function does not map (the caller then reads the whole tensor).
    """
    dim, start, stop = shard
    if conversion == "copy":
        index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(shape)))
        return sliced[index].contiguous()
    if conversion == "transpose":  # ours [out, in] = hf [in, out].t()
        index = (slice(None), slice(start, stop)) if dim == 0 else (slice(start, stop), slice(None))
        return sliced[index].t().contiguous()
    if conversion == "vocab" and dim == 0:
        part = torch.zeros((stop - start, *shape[1:]), dtype=_safetensors_dtype(sliced))
        real_stop = min(stop, cfg.vocab_size)
        if real_stop > start:
            part[: real_stop - start] = sliced[start:real_stop]
        return part
    head_rows = 3 * (cfg.n_embd // cfg.n_head)  # q, k and v rows of one head
    if (
        conversion in ("qkv_weight", "qkv_bias")
        and dim == 0
        and start % head_rows == 0
        and stop % head_rows == 0
    ):
        # Our rows (head, q|k|v, dim) for heads h0:h1 are, in the checkpoint, three column ranges.
        hd = cfg.n_embd // cfg.n_head
        h0, h1 = start // head_rows, stop // head_rows
        cols = [(j * cfg.n_embd + h0 * hd, j * cfg.n_embd + h1 * hd) for j in range(3)]
        if conversion == "qkv_weight":
            parts = [sliced[:, a:b] for a, b in cols]  # each [C, heads * hd]
            stacked = torch.cat(parts, dim=1)  # [C, 3 * heads * hd] in (q|k|v, head, dim) order
            return _hf_to_ours(stacked, "qkv_weight", h1 - h0).contiguous()
        stacked = torch.cat([sliced[a:b] for a, b in cols])
        return _hf_to_ours(stacked, "qkv_bias", h1 - h0).contiguous()
    return None


def _safetensors_dtype(sliced: Any) -> torch.dtype:
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return names.get(sliced.get_dtype(), torch.float32)


def gpt2_weight_source(path: str | os.PathLike, network: GPTNetwork) -> Callable[..., Tensor]:
    """``source(our_name, global_shape, shard=None)``: one of our parameters from a HF GPT-2 directory.

    With ``shard=(dim, start, stop)`` only that slice of our tensor is read from disk (memory-mapped
    ``get_slice``): a tensor-parallel rank never holds a whole sharded weight. Slices that do not map onto
    a contiguous read (q/k/v split inside a head) fall back to reading the tensor.

    The checkpoint's structure (vocab_size, n_layer, n_head, n_embd, n_positions) must match
    ``network.cfg``; a tied checkpoint may be loaded into an untied network (the head starts as a copy of
    the embedding), not the reverse. Each call memory-maps the file holding the tensor and reads that one
    tensor; vocabulary rows are padded with zeros up to the requested shape. Works with either
    ``transformer.``-prefixed keys (``GPT2LMHeadModel``) or bare keys (``GPT2Model``).
    """
    from safetensors import safe_open

    directory = Path(path)
    hf_config = _validated_hf_config(directory)
    cfg = network.cfg
    ours = {
        "vocab_size": cfg.vocab_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
    }
    differ = [f"{k}: checkpoint {hf_config[k]}, model {v}" for k, v in ours.items() if hf_config[k] != v]
    if not cfg.bias:
        differ.append("bias: checkpoint True (GPT-2 has biases), model False")
    if differ:
        raise ValueError(
            f"the model does not have the shape of the checkpoint in {str(directory)!r}: " + "; ".join(differ)
        )
    ckpt_tied = bool(hf_config["tie_word_embeddings"])
    if cfg.tie_embeddings and not ckpt_tied:
        raise ValueError(
            f"the checkpoint in {str(directory)!r} has an untied lm_head (tie_word_embeddings=False) but the model "
            "ties its head to the embedding (tie_embeddings=True): construct it with tie_embeddings=False."
        )

    key_map = _safetensors_key_map(directory)
    prefixed = any(k.startswith("transformer.") for k in key_map)  # GPT2Model checkpoints have bare keys

    def source(name: str, shape: torch.Size, shard: tuple[int, int, int] | None = None) -> Tensor:
        key, conversion = _hf_key(name)
        if key == "lm_head.weight" and ckpt_tied:
            key = "transformer.wte.weight"  # the head of a tied checkpoint is its token embedding
        if not prefixed and key.startswith("transformer."):
            key = key[len("transformer.") :]
        file = key_map.get(key)
        if file is None:
            raise CheckpointKeyError(
                f"tensor {key!r} (for parameter {name!r}) is missing from the checkpoint in {str(directory)!r}."
            )
        shape = torch.Size(shape)
        if conversion == "vocab":  # padded rows are added here, so the checkpoint has exactly vocab_size rows
            expected = [cfg.vocab_size, *shape[1:]]
        elif conversion in ("transpose", "qkv_weight"):
            expected = list(reversed(shape))
        else:
            expected = list(shape)
        with safe_open(str(file), framework="pt") as f:
            sliced = f.get_slice(key)
            got = list(sliced.get_shape())
            if got != expected or (conversion == "vocab" and shape[0] < cfg.vocab_size):
                raise CheckpointKeyError(
                    f"shape mismatch for parameter {name!r} (checkpoint tensor {key!r}): expected {expected} "
                    f"(our shape {list(shape)}), got {got}."
                )
            if shard is not None:
                part = _read_shard(sliced, conversion, shard, shape, cfg)
                if part is not None:
                    return part
            tensor = f.get_tensor(key)
        if conversion == "vocab":
            full = tensor.new_zeros(shape)
            full[: cfg.vocab_size] = tensor
            return full
        return _hf_to_ours(tensor, conversion, cfg.n_head).contiguous()

    return source


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------
