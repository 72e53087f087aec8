"""Writing Hugging Face GPT-2 directories: from a one-process model, and from a sharded checkpoint.

The checkpoint exporter is registered with :mod:`lightning_par.checkpoint.hf` by ``lightning_par.models``
(the checkpoint package imports no model).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_par.models.hf import _LAYER_MAP, _TOP_MAP, CheckpointKeyError, _hf_key, _ours_to_hf
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.models.gpt import GPT, GPTConfig


def _our_names(cfg: GPTConfig) -> list[str]:
    names = list(_TOP_MAP)
    names += [f"layers.{i}.{n}" for i in range(cfg.n_layer) for n in _LAYER_MAP]
    if not cfg.tie_embeddings:
        names.append("head.weight")
    return names


def gpt2_state_dict_to_hf(our_state: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Our full (unsharded) state dict -> ``GPT2LMHeadModel`` tensors (``transformer.*``, ``lm_head.weight``).

    Accepts the network's keys (``embed.wte.weight``...) or the LightningModule's (``model.embed...``).
    Padded vocabulary rows are dropped. A model built with ``bias=False`` is written with zero biases,
    which computes the same function. ``lm_head.weight`` is written only for untied models (HF re-ties
    it on load otherwise). Returns contiguous tensors that share no storage.
    """
    from torch.distributed.tensor import DTensor

    if any(k.startswith("model.") for k in our_state):
        our_state = {k[len("model.") :]: v for k, v in our_state.items() if k.startswith("model.")}
    expected = _our_names(cfg)
    allowed = set(expected) | {"head.weight"}
    unexpected = sorted(k for k in our_state if k not in allowed)
    if unexpected:
        raise CheckpointKeyError(
            f"state dict has keys a GPT with n_layer={cfg.n_layer} does not: {unexpected[:8]}"
            + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        )
    out: dict[str, Tensor] = {}
    wte = our_state.get("embed.wte.weight")
    dtype = wte.dtype if wte is not None else torch.get_default_dtype()
    for name in expected:
        key, conversion = _hf_key(name)
        tensor = our_state.get(name)
        if tensor is None:
            if name.endswith("bias") and not cfg.bias:
                tensor = torch.zeros(_bias_size(name, cfg), dtype=dtype)
            else:
                raise CheckpointKeyError(f"state dict is missing {name!r} (needed for {key!r}).")
        if isinstance(tensor, DTensor):
            raise TypeError(
                f"{name!r} is a sharded DTensor: gather a full state dict first (e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(..., "
                "options=StateDictOptions(full_state_dict=True))) or use one process."
            )
        tensor = tensor.detach()
        if conversion == "vocab":
            if tensor.shape[0] < cfg.vocab_size:
                raise CheckpointKeyError(
                    f"shape mismatch for {name!r}: expected at least {cfg.vocab_size} rows, got {list(tensor.shape)}."
                )
            tensor = tensor[: cfg.vocab_size]
        else:
            tensor = _ours_to_hf(tensor, conversion, cfg.n_head)
        out[key] = tensor.to("cpu").contiguous().clone()
    return out


def _bias_size(name: str, cfg: GPTConfig) -> int:
    return (
        4 * cfg.n_embd if name.endswith("mlp.fc.bias") else (3 * cfg.n_embd if "qkv" in name else cfg.n_embd)
    )


def save_gpt2_hf(our_full_state_dict: dict[str, Tensor], cfg: GPTConfig, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
    from transformers import GPT2Config

    tensors = gpt2_state_dict_to_hf(our_full_state_dict, cfg)
    dtype = tensors["transformer.wte.weight"].dtype
    special = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=special,
        eos_token_id=special,
        architectures=["GPT2LMHeadModel"],
        dtype=str(dtype).removeprefix("torch."),
    )
    return save_hf_directory(hf_config, tensors, out_dir)


def save_hf_directory(hf_config: Any, tensors: dict[str, Tensor], out_dir: str | os.PathLike) -> Path:
    """``config.json`` and ``model.safetensors`` in ``out_dir``: what ``from_pretrained`` reads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def export_gpt2(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Save a single-process :class:`GPT` (plain tensors) as a Hugging Face GPT-2 directory."""
    if model.model is None:
        raise RuntimeError("call configure_model() before export_gpt2: the model has no network yet.")
    return save_gpt2_hf(model.model.state_dict(), model.config, out_dir)


def model_for_export(cls: type, hparams: dict[str, Any], saved: Any) -> Any:
    """A one-process ``cls`` (a :class:`~lightning_par.models.causal_lm.CausalLM`) rebuilt from a
    checkpoint's hyper-parameters, its network's padded vocabulary read off the saved embedding."""
    import inspect

    if not hparams or "n_layer" not in hparams:
        raise ValueError(f"the checkpoint has no {cls.__name__} hyper-parameters to rebuild the model from.")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "hf_checkpoint"}
    model = cls(**{k: v for k, v in hparams.items() if k in accepted})
    wte = saved.get("model.embed.wte.weight")
    if wte is None:
        raise KeyError(f"the checkpoint has no model.embed.wte.weight: not a {cls.__name__} checkpoint.")
    model.model = model._build_network(int(wte.size[0]))
    return model


def export_gpt2_checkpoint(
    hparams: dict[str, Any], saved: Any, load: Callable[[dict[str, Tensor]], None], out: Path
) -> Path:
    """``lightning-par export-hf`` for a GPT checkpoint: rebuild the model whole, ``load`` its state, save.

    The model shape comes from the hyper-parameters in ``meta.pt``, the padded vocabulary from the saved
    tensors.
    """
    from lightning_par.models.gpt import GPT

    model = model_for_export(GPT, hparams, saved)
    if model.config.num_experts:
        raise ValueError(
            "the checkpoint is a mixture-of-experts GPT (num_experts="
            f"{model.config.num_experts}); GPT-2 in transformers has no expert layers, so it cannot be exported "
            f"as GPT2LMHeadModel. Export a dense GPT (num_experts=0)."
        )
    load(model.state_dict())
    return export_gpt2(model, out)
