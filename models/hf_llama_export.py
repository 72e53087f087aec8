"""Writing Hugging Face Llama / Mixtral directories: from a one-process model, and from a sharded checkpoint.

A dense model is written as ``LlamaForCausalLM`` (a Mistral checkpoint without sliding window loaded
here computes exactly that), a MoE one as ``MixtralForCausalLM`` with one tensor per expert
(``block_sparse_moe.experts.{e}.w1/w2/w3``, the layout of published Mixtral checkpoints, which
transformers 4 and 5 both load). The checkpoint exporter is registered with
:mod:`lightning_par.checkpoint.hf` by ``lightning_par.models``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_par.models.hf import CheckpointKeyError
from lightning_par.models.hf_export import model_for_export, save_hf_directory
from lightning_par.models.hf_llama import EXPERT_KEYS, LAYER_KEYS, hf_key
from lightning_par.models.llama_network import mlp_width_dim
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.models.llama import Llama
    from lightning_par.models.llama_network import LlamaConfig


def _our_names(cfg: LlamaConfig) -> list[str]:
    names = ["embed.wte.weight", "norm.weight"]
    for i in range(cfg.n_layer):
        layer = f"layers.{i}."
        names += [layer + n for n in ("ln_1.weight", "ln_2.weight", "attn.q.weight", "attn.kv.weight")]
        names.append(layer + "attn.proj.weight")
        if cfg.num_experts:
            names.append(layer + "mlp.router.gate.weight")
            names += [
                f"{layer}mlp.experts.{e}.{w}.weight" for e in range(cfg.num_experts) for w in EXPERT_KEYS
            ]
        else:
            names += [layer + n for n in LAYER_KEYS if n.startswith("mlp.") and "router" not in n]
    if not cfg.tie_word_embeddings:
        names.append("head.weight")
    return names


def llama_state_dict_to_hf(our_state: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Our full (unsharded) state dict -> ``LlamaForCausalLM`` / ``MixtralForCausalLM`` tensors.

    Accepts the network's keys or the LightningModule's (``model.``-prefixed). Padded vocabulary rows are
    dropped, and so is the MLP's padding (gate / up rows, ``proj`` columns past ``intermediate_size``),
    which must be zero (else the model is not the one Hugging Face would compute: ``ValueError``); ``kv``
    is split back into ``k_proj`` and ``v_proj``; ``lm_head.weight`` is written only for untied models.
    Returns contiguous CPU tensors that share no storage.
    """
    from torch.distributed.tensor import DTensor

    if any(k.startswith("model.") for k in our_state):
        our_state = {k[len("model.") :]: v for k, v in our_state.items() if k.startswith("model.")}
    expected = _our_names(cfg)
    unexpected = sorted(set(our_state) - set(expected) - {"head.weight"})
    if unexpected:
        raise CheckpointKeyError(f"state dict has keys this Llama does not: {unexpected[:8]}")
    out: dict[str, Tensor] = {}
    D = cfg.head_dim
    for name in expected:
        tensor = our_state.get(name)
        if tensor is None:
            raise CheckpointKeyError(f"state dict is missing {name!r}.")
        if isinstance(tensor, DTensor):
            raise TypeError(
                f"{name!r} is a sharded DTensor: gather a full state dict first or use one process."
            )
        tensor = tensor.detach().to("cpu")
        key = hf_key(name, cfg)
        if name in ("embed.wte.weight", "head.weight"):
            if tensor.shape[0] < cfg.vocab_size:
                raise CheckpointKeyError(f"{name!r} has {tensor.shape[0]} rows, fewer than vocab_size.")
            out[key] = tensor[: cfg.vocab_size].contiguous().clone()
        elif (dim := mlp_width_dim(name)) is not None:
            out[key] = _cut_mlp_padding(name, tensor, dim, cfg.intermediate_size).contiguous().clone()
        elif isinstance(key, tuple):  # [kv head, (k|v), head_dim] rows -> k_proj, v_proj
            kv = tensor.view(cfg.n_kv_head, 2, D, -1)
            for j, k in enumerate(key):
                out[k] = kv[:, j].reshape(cfg.n_kv_head * D, -1).contiguous().clone()
        else:
            out[key] = tensor.contiguous().clone()
    return out


def _cut_mlp_padding(name: str, tensor: Tensor, dim: int, width: int) -> Tensor:
    """``tensor`` cut to the real MLP ``width`` along ``dim``, after checking that what is cut is zero."""
    size = tensor.shape[dim]
    if size < width:
        raise CheckpointKeyError(f"{name!r} has an MLP width of {size}, less than intermediate_size={width}.")
    pad = tensor.narrow(dim, width, size - width)
    if pad.any():
        what = "rows" if dim == 0 else "columns"
        raise ValueError(
            f"{name!r} has nonzero values in its padded {what} {width}:{size} (the MLP is zero-padded past "
            f"intermediate_size={width}, and those zeros must stay zero); a Hugging Face model of width "
            f"{width} cannot compute this model, so it is not exported."
        )
    return tensor.narrow(dim, 0, width)


def save_llama_hf(
    our_full_state_dict: dict[str, Tensor], cfg: LlamaConfig, out_dir: str | os.PathLike
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import MixtralConfig

    tensors = llama_state_dict_to_hf(our_full_state_dict, cfg)
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        dtype=str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch."),
    )
    if cfg.num_experts:
        hf_config = MixtralConfig(
            **common,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_top_k,
            router_aux_loss_coef=cfg.moe_aux_loss_coef,
            sliding_window=None,
            architectures=["MixtralForCausalLM"],
        )
    else:
        hf_config = HFLlamaConfig(
            **common, attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"]
        )
    return save_hf_directory(hf_config, tensors, out_dir)


def export_llama(model: Llama, out_dir: str | os.PathLike) -> Path:
    """Save a single-process :class:`~lightning_par.models.Llama` (plain tensors) as a HF directory."""
    if model.model is None:
        raise RuntimeError("call configure_model() before export_llama: the model has no network yet.")
    return save_llama_hf(model.model.state_dict(), model.config, out_dir)


def export_llama_checkpoint(
    hparams: dict[str, Any], saved: Any, load: Callable[[dict[str, Tensor]], None], out: Path
) -> Path:
    """``lightning-par export-hf`` for a Llama / Mixtral checkpoint of any layout (one process)."""
    from lightning_par.models.llama import Llama

    # (checkpoints from before the MLP padding have no such hyper-parameter, and an unpadded MLP)
    model = model_for_export(Llama, {"pad_intermediate_size_multiple": 1, **hparams}, saved)
    load(model.state_dict())
    return export_llama(model, out)
