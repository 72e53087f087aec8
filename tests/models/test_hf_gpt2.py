"""Hugging Face GPT-2 <-> GPT conversion, in one process, against tiny random local checkpoints.

Tolerances: both sides compute in float32 on the same weights, but with different kernels (HF's Conv1D
is ``addmm`` on ``[in, out]`` weights, its "gelu_new" is written out in Python, its attention may take
another path), so sums are taken in different orders. With unit-scale activations that leaves
differences around 1e-6; atol/rtol 1e-5 is tight enough that any layout mistake (a wrong head order,
a missing transpose, a dropped bias) fails by orders of magnitude more.
"""

from __future__ import annotations

import json

import pytest
import torch
from lightning_par.models.gpt import GPT
from lightning_par.models.hf import CheckpointKeyError, gpt2_config_kwargs, gpt2_weight_source
from lightning_par.models.hf_export import export_gpt2, gpt2_state_dict_to_hf, save_gpt2_hf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 1001  # not a multiple of 64: our model pads it to 1024
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _hf_config(**kw) -> GPT2Config:
    base = {
        "vocab_size": VOCAB,
        "n_positions": 32,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    return GPT2Config(**{**base, **kw})


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (HF's init leaves biases 0 and LayerNorm weights 1, which hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if ".ln_" in name or "ln_f" in name or name.startswith("norm") or ".norm." in name:
            p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
        else:
            p.copy_(0.1 * noise)


def _tiny_hf(path, seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(_hf_config(**kw)).eval()
    _randomize(hf, seed + 1)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def _batch(seed: int = 0, batch: int = 3, seq: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[1, -3:] = -100
    labels[2, 0] = -100
    return ids, labels


def _ours(path, **overrides) -> GPT:
    m = GPT.from_hf(path, **overrides)
    m.configure_model()
    return m.eval()


def _compare(ours: GPT, hf: GPT2LMHeadModel) -> tuple[float, float]:
    """Assert equal logits and loss; return (max abs logit difference, abs loss difference)."""
    ids, labels = _batch()
    with torch.no_grad():
        logits = ours(ids)
        out = hf(input_ids=ids, labels=labels)
        loss_sum, count = ours._loss({"input_ids": ids, "labels": labels})
    assert logits.shape == (3, 32, ours.config.padded_vocab_size())
    # Padded vocabulary rows of the tied embedding are zero, so their logits are exactly zero.
    if ours.config.tie_embeddings:
        assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))
    logits = logits[..., :VOCAB]
    assert out.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(logits, out.logits, **TOL)
    assert count.item() == (labels[:, 1:] != -100).sum().item()
    loss = loss_sum / count
    torch.testing.assert_close(loss, out.loss, **TOL)
    return (logits - out.logits).abs().max().item(), (loss - out.loss).abs().item()


# ---- config ----------------------------------------------------------------------------------------------


def test_config_kwargs(tmp_path):
    _tiny_hf(tmp_path, resid_pdrop=0.05, layer_norm_epsilon=1e-6)
    kw = gpt2_config_kwargs(tmp_path)
    assert kw == {
        "vocab_size": VOCAB,
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 64,
        "block_size": 32,
        "bias": True,
        "dropout": 0.05,
        "tie_embeddings": True,
        "layer_norm_eps": 1e-6,
    }


# ---- loading ---------------------------------------------------------------------------------------------


def test_from_hf_matches_logits_and_loss(tmp_path):
    hf = _tiny_hf(tmp_path)
    ours = _ours(tmp_path)
    assert ours.config.padded_vocab_size() == 1024
    wte = ours.model.embed.wte.weight
    assert ours.model.head.weight is wte  # still tied after loading
    assert torch.equal(wte[:VOCAB], hf.transformer.wte.weight)
    assert torch.equal(wte[VOCAB:], torch.zeros(1024 - VOCAB, 64))
    logit_diff, loss_diff = _compare(ours, hf)
    print(f"tied: max |logits diff| = {logit_diff:.3g}, |loss diff| = {loss_diff:.3g}")


def test_qkv_rows_are_grouped_by_head(tmp_path):
    hf = _tiny_hf(tmp_path)
    ours = _ours(tmp_path)
    c_attn = hf.transformer.h[1].attn.c_attn  # Conv1D: weight [C, 3C], columns [q | k | v]
    qkv = ours.model.layers["1"].attn.qkv  # Linear: weight [3C, C], rows [head, (q, k, v), head_dim]
    w = qkv.weight.view(4, 3, 16, 64)
    b = qkv.bias.view(4, 3, 16)
    for head in range(4):
        for j in range(3):  # q, k, v
            cols = slice(j * 64 + head * 16, j * 64 + (head + 1) * 16)
            assert torch.equal(w[head, j], c_attn.weight[:, cols].t())
            assert torch.equal(b[head, j], c_attn.bias[cols])


def test_untied_checkpoint(tmp_path):
    hf = _tiny_hf(tmp_path, tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ours = _ours(tmp_path)
    assert ours.config.tie_embeddings is False
    assert ours.model.head.weight is not ours.model.embed.wte.weight
    assert torch.equal(ours.model.head.weight[:VOCAB], hf.lm_head.weight)
    logit_diff, loss_diff = _compare(ours, hf)
    print(f"untied: max |logits diff| = {logit_diff:.3g}, |loss diff| = {loss_diff:.3g}")


def test_tied_checkpoint_into_untied_model(tmp_path):
    hf = _tiny_hf(tmp_path)
    ours = _ours(tmp_path, tie_embeddings=False)
    assert ours.model.head.weight is not ours.model.embed.wte.weight
    assert torch.equal(ours.model.head.weight, ours.model.embed.wte.weight)
    _compare(ours, hf)


def test_sharded_checkpoint_without_prefix(tmp_path):
    hf = _tiny_hf(tmp_path / "full")
    # GPT2Model checkpoints have bare keys ("h.0.attn...", no "transformer."); shard it into several files.
    hf.transformer.save_pretrained(tmp_path / "bare", max_shard_size="100KB")
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    index = json.loads((tmp_path / "bare" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "wte.weight" in index["weight_map"]
    _compare(_ours(tmp_path / "bare"), hf)


def test_weight_source_pads_vocab_to_requested_rows(tmp_path):
    hf = _tiny_hf(tmp_path)
    network = GPT.from_hf(tmp_path)
    network.configure_model()
    source = gpt2_weight_source(tmp_path, network.model)
    wte = source("embed.wte.weight", torch.Size([1152, 64]))  # e.g. the padding for tp=3
    assert wte.shape == (1152, 64)
    assert torch.equal(wte[:VOCAB], hf.transformer.wte.weight)
    assert not wte[VOCAB:].any()
    fc = source("layers.0.mlp.fc.weight", torch.Size([256, 64]))
    assert fc.is_contiguous() and torch.equal(fc, hf.transformer.h[0].mlp.c_fc.weight.t())


def test_weight_source_reads_only_the_requested_shard(tmp_path):
    """Every tensor-parallel slice equals the same slice of the whole tensor; the usual tp slices (whole
    heads, vocab rows, row/column splits) come back already cut, i.e. read from disk as a slice."""
    _tiny_hf(tmp_path)
    model = GPT.from_hf(tmp_path)
    model.configure_model()
    source = gpt2_weight_source(tmp_path, model.model)
    checked = 0
    for name, param in model.model.named_parameters():
        whole = source(name, param.shape)
        for dim in range(param.ndim):
            for parts in (2, 4):
                if param.shape[dim] % parts:
                    continue
                step = param.shape[dim] // parts
                for rank in range(parts):
                    shard = (dim, rank * step, (rank + 1) * step)
                    got = source(name, param.shape, shard)
                    expected = whole.narrow(dim, rank * step, step)
                    # Not tensor-parallel slices (read whole, then cut): q/k/v or vocab split by columns.
                    column_cut = dim == 1 and ("qkv.weight" in name or "wte" in name or name == "head.weight")
                    if not column_cut:
                        assert got.shape == expected.shape, f"{name} {shard}: read the whole tensor"
                    else:
                        got = got.narrow(dim, rank * step, step)
                    assert torch.equal(got, expected), f"{name} {shard}"
                    checked += 1
    assert checked > 100


# ---- saving ----------------------------------------------------------------------------------------------


def _random_gpt(seed: int, **kw) -> GPT:
    m = GPT(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=32, init_seed=seed, **kw)
    m.configure_model()
    _randomize(m.model, seed)
    with torch.no_grad():  # padded rows are zero in any model we build or load
        m.model.embed.wte.weight[VOCAB:] = 0
        m.model.head.weight[VOCAB:] = 0
    return m.eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_round_trip(tmp_path, tie):
    ours = _random_gpt(3, tie_embeddings=tie)
    export_gpt2(ours, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is (not tie)
    assert "transformer.h.1.attn.c_attn.weight" in keys

    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.tie_word_embeddings is tie
    assert hf.config.activation_function == "gelu_new"
    logit_diff, loss_diff = _compare(ours, hf)
    print(
        f"export ({'tied' if tie else 'untied'}): max |logits diff| = {logit_diff:.3g}, |loss diff| = {loss_diff:.3g}"
    )

    # And back: the reloaded parameters are bit-identical to the originals.
    back = _ours(tmp_path)
    original = ours.model.state_dict()
    reloaded = back.model.state_dict()
    assert original.keys() == reloaded.keys()
    for name, value in original.items():
        assert torch.equal(value, reloaded[name]), name


def test_state_dict_to_hf_accepts_lightning_keys_and_rejects_strays():
    ours = _random_gpt(4)
    lightning_state = ours.state_dict()
    assert any(k.startswith("model.") for k in lightning_state)
    hf_state = gpt2_state_dict_to_hf(lightning_state, ours.config)
    assert hf_state["transformer.wte.weight"].shape == (VOCAB, 64)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert hf_state["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
    assert "lm_head.weight" not in hf_state
    assert all(t.is_contiguous() for t in hf_state.values())
    # The inverse of the loader's head-interleaving.
    q_head1 = ours.model.layers["0"].attn.qkv.weight.view(4, 3, 16, 64)[1, 0]
    assert torch.equal(hf_state["transformer.h.0.attn.c_attn.weight"][:, 16:32], q_head1.t())

    state = ours.model.state_dict()
    state["layers.2.ln_1.weight"] = torch.ones(64)
    with pytest.raises(KeyError, match=r"layers\.2\.ln_1\.weight"):
        gpt2_state_dict_to_hf(state, ours.config)
    del state["layers.2.ln_1.weight"], state["norm.bias"]
    with pytest.raises(KeyError, match=r"missing 'norm\.bias'"):
        gpt2_state_dict_to_hf(state, ours.config)


def test_save_bias_free_model_writes_zero_biases(tmp_path):
    ours = _random_gpt(5, bias=False)
    assert ours.model.layers["0"].attn.qkv.bias is None
    save_gpt2_hf(ours.model.state_dict(), ours.config, tmp_path)
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not hf.transformer.h[0].attn.c_attn.bias.any()
    _compare(ours, hf.eval())


# ---- errors ----------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gpt2_config_kwargs(tmp_path)


def test_pickle_only_directory_is_refused(tmp_path):
    _hf_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    m = GPT.from_hf(tmp_path)  # the config alone is fine
    with pytest.raises(FileNotFoundError, match=r"safetensors is required.*pytorch_model\.bin"):
        m.configure_model()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation_function": "relu"}, r"activation_function='relu'.*gelu_new"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"model_type": "llama"}, "'llama' checkpoint"),
    ],
)
def test_unsupported_config(tmp_path, change, message):
    config = _hf_config().to_dict()
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        GPT.from_hf(tmp_path)


def test_model_shape_must_match_checkpoint(tmp_path):
    _tiny_hf(tmp_path)
    m = GPT.from_hf(tmp_path, n_head=2)  # same tensor shapes, different head split: must not load silently
    with pytest.raises(ValueError, match="n_head: checkpoint 4, model 2"):
        m.configure_model()


def test_untied_checkpoint_into_tied_model(tmp_path):
    _tiny_hf(tmp_path, tie_word_embeddings=False)
    m = GPT.from_hf(tmp_path, tie_embeddings=True)
    with pytest.raises(ValueError, match="untied lm_head"):
        m.configure_model()


def test_missing_tensor_and_shape_mismatch(tmp_path):
    _tiny_hf(tmp_path)
    file = tmp_path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    broken = dict(tensors)
    del broken["transformer.h.1.mlp.c_fc.bias"]
    save_file(broken, str(file), metadata={"format": "pt"})
    with pytest.raises(
        KeyError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias'.*'layers\.1\.mlp\.fc\.bias'.*missing"
    ):
        _ours(tmp_path)

    broken = dict(tensors)
    broken["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:16].clone()
    save_file(broken, str(file), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointKeyError, match=r"'embed\.wpe\.weight'.*expected \[32, 64\].*got \[16, 64\]"
    ):
        _ours(tmp_path)
