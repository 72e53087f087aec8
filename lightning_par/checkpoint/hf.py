"""Hugging Face export of sharded checkpoints through adapters that model families register."""

from __future__ import annotations

from pathlib import Path

from lightning_par.checkpoint.safe import SafeFileSystemReader, read_meta, resolve
from lightning_par.checkpoint.sharded import _dcp_load


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory from a sharded GPT or BERT checkpoint, in one process.

    GPT gives ``GPT2LMHeadModel``; BERT gives ``BertForMaskedLM`` or ``BertForSequenceClassification``
    (told apart by the saved tensor names). No process group and no training layout are needed: DCP reads
    every shard into whole tensors. The model shape comes from the hyper-parameters in ``meta.pt``; the
    padded vocabulary from the saved tensors.
    """
    import inspect

    from lightning_par.models.gpt import GPT, GPTNetwork
    from lightning_par.models.hf import export_gpt2

    path = resolve(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out_dir={str(out)!r} exists and is not empty; choose a new directory.")
    meta = read_meta(path)
    hparams = dict(meta.get("hyper_parameters") or {})
    if not hparams or "n_layer" not in hparams:
        raise ValueError(
            f"the checkpoint in {str(path)!r} has no GPT hyper-parameters to rebuild the model from."
        )
    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    if "model.embed.tte.weight" in saved:  # token-type embeddings: a BERT checkpoint
        from lightning_par.models.hf_bert import export_bert_checkpoint

        return export_bert_checkpoint(hparams, saved, lambda s: _dcp_load(s, reader, path, no_dist=True), out)
    accepted = set(inspect.signature(GPT.__init__).parameters) - {"self", "hf_checkpoint"}
    model = GPT(**{k: v for k, v in hparams.items() if k in accepted})
    if model.config.num_experts:
        raise ValueError(
            f"the checkpoint in {str(path)!r} is a mixture-of-experts GPT (num_experts="
            f"{model.config.num_experts}); GPT-2 in transformers has no expert layers, so it cannot be exported "
            f"as GPT2LMHeadModel. Export a dense GPT (num_experts=0)."
        )
    wte = saved.get("model.embed.wte.weight")
    if wte is None:
        raise KeyError(
            f"the checkpoint in {str(path)!r} has no model.embed.wte.weight: not a GPT checkpoint."
        )
    model.model = GPTNetwork(model.config, int(wte.size[0]))
    state = model.state_dict()
    _dcp_load(state, reader, path, no_dist=True)
    return export_gpt2(model, out)
