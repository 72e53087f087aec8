"""Llama, Mistral and Mixtral: Hugging Face parity on every layout, layout parity in training, export, and
bad input refused by name.

The Hugging Face checkpoints are tiny random models saved locally with an awkward shape: a vocabulary of
1001 (not a multiple of 64: ours is padded), 6 query heads over 2 kv heads, an odd MLP width of 91 (ours
is zero-padded to 96: 48 rows per tp rank, the second rank's reaching into the padding), every tensor (norms
and router included) random. Tolerances are the GPT-2 tests': both sides
compute in fp32 on the same weights with other kernels and summation orders (differences around 1e-6), so
1e-5 fails any layout mistake (a swapped k/v, a wrong rotary half, a kv head given to the wrong queries) by
orders of magnitude. The training parity runs are compared with a plain one-process PyTorch loop
(:mod:`tests.parity`) at the layout tests' bar.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import pytest
import torch
from lightning_par.models import Llama
from lightning_par.models.hf_llama import llama_config_kwargs, llama_weight_source
from lightning_par.models.hf_llama_export import llama_state_dict_to_hf
from lightning_par.models.llama_network import mlp_width_dim
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import lightning_par
from lightning_par.experts.layer import MoE
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, FixedBatches, assert_same_run, merge_ranks, quiet_trainer, reference_run
from tests.parity import trainer_run as _trainer_run

VOCAB = 1001
TOL = {"atol": 1e-5, "rtol": 1e-5}
RTOL, ATOL = 1e-5, 1e-6  # layout parity: fp32 sums in another order
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=91,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
)
# (transformers' default grouped-matmul experts need 16-byte strides, which a width of 91 does not have)
PADDED_MLP = 96  # the network's MLP width: 91 zero-padded to a multiple of 16
MIXTRAL = {**SHAPE, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
EAGER = {"experts_implementation": "eager"}
ROWS, SEQ = 4, 24
# Training parity: a tiny Llama (4 query heads, vocabulary 250) on the parity tests' fixed batches.
TINY = dict(
    vocab_size=250,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    intermediate_size=48,
    max_position_embeddings=16,
)
STEPS, BATCH = 3, 4
MQA = {"n_kv_head": 1}  # at tp2 the one kv head is replicated on both ranks
MOE = {"num_experts": 4, "moe_aux_loss_coef": 0.02}


# ---- checkpoints and batches ------------------------------------------------------------------------------
@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (HF's init leaves norms at 1, which hides a swapped norm)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def _save(path: Any, kind: str = "llama", seed: int = 0, **kw: Any) -> torch.nn.Module:
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, SHAPE),
        "mistral": (MistralConfig, MistralForCausalLM, {**SHAPE, "sliding_window": None}),
        "mixtral": (MixtralConfig, MixtralForCausalLM, {**MIXTRAL, **EAGER}),
    }
    config_cls, model_cls, shape = classes[kind]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**shape, **kw})).eval()
    _randomize(hf, seed + 1)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(seed))


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[1:, -3:] = -100
    return labels


class Rows(Dataset):
    """The rows of ``ids`` as predict batches (``input_ids`` only) or validation batches (with labels)."""

    def __init__(self, ids: torch.Tensor, labelled: bool) -> None:
        self.ids, self.labels, self.labelled = ids, _labels(ids), labelled

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {"input_ids": self.ids[i]}
        return {**row, "labels": self.labels[i]} if self.labelled else row


def _hf(hf: torch.nn.Module, ids: torch.Tensor, mixtral: bool = False) -> Any:
    with torch.no_grad():
        kw = {"output_router_logits": True} if mixtral else {}
        return hf(input_ids=ids, labels=_labels(ids), **kw)


def _hf_choices(out: Any, top_k: int = 2) -> list[torch.Tensor]:
    """The experts HF's router chose, per layer: ``[B * T, k]``, tokens batch-major."""
    return [logits.float().softmax(-1).topk(top_k, dim=-1).indices for logits in out.router_logits]


# ---- what a rank records ------------------------------------------------------------------------------------
class Routed(L.Callback):
    """Per predict batch: its token ids and, for each MoE layer this rank holds, the experts chosen."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.active = False

    def on_predict_start(self, trainer, pl_module) -> None:
        self.active = True
        for i, moe in pl_module.model.moe_modules().items():
            moe.router.register_forward_hook(self._hook(i, moe))

    def on_predict_end(self, trainer, pl_module) -> None:
        self.active = False

    def _hook(self, layer: int, moe: MoE) -> Any:
        def hook(module, args, routing) -> None:
            if self.active and moe.record:  # (not the pipeline's shape inference)
                self.batches[-1]["experts"].setdefault(layer, []).append(routing.expert_index.clone())

        return hook

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches.append({"ids": batch["input_ids"].clone(), "experts": {}})


def _hf_layout(strategy: Any, world: int, path: str) -> dict:
    """``Llama.from_hf(path)`` under ``strategy``: predictions (with routing) and the validation loss."""
    model = Llama.from_hf(path)
    routed = Routed()
    trainer = quiet_trainer(strategy, world, callbacks=[routed])
    logits = trainer.predict(model, DataLoader(Rows(_ids(), labelled=False), batch_size=2))
    loss = trainer.validate(model, DataLoader(Rows(_ids(), labelled=True), batch_size=2), verbose=False)
    batches = [
        {**b, "experts": {i: torch.cat(e) for i, e in b["experts"].items()}, "logits": lg}
        for b, lg in zip(routed.batches, logits, strict=True)
    ]
    return {"batches": batches, "loss": loss[0]["val/loss"]}


def _check_hf_layout(results: list[dict], hf: torch.nn.Module, what: str, mixtral: bool = False) -> None:
    """Every rank's logits equal HF's for its rows; the loss equals HF's; routing equals HF's per token."""
    ref = _hf(hf, _ids())  # (with router logits HF's Mixtral would add its aux loss to the loss)
    layers_checked: set[int] = set()
    for r in results:
        assert r["loss"] == pytest.approx(float(ref.loss), rel=1e-5, abs=1e-6), what
        for b in r["batches"]:
            out = _hf(hf, b["ids"], mixtral)
            assert out.logits.abs().max() > 1.0  # not a comparison of near-zero tensors
            torch.testing.assert_close(b["logits"], out.logits, **TOL, msg=lambda m: f"{what} logits: {m}")
            if mixtral:
                choices = _hf_choices(out)
                for layer, experts in b["experts"].items():
                    assert torch.equal(experts, choices[layer]), f"{what}: routing differs in layer {layer}"
                    layers_checked.add(layer)
    if mixtral:
        assert layers_checked == set(range(MIXTRAL["num_hidden_layers"])), (what, layers_checked)


def _train(make: Any, world: int, kw: dict) -> dict:
    return _trainer_run(make(), world, STEPS, BATCH, 0.05, _data(), kw, model_cls=Llama, base_kw=TINY)


def _data() -> FixedBatches:
    return FixedBatches(64, TINY["max_position_embeddings"], TINY["vocab_size"], ignore_some=True)


def _mlp_padding(model: Llama) -> tuple[int, float]:
    """(how many MLP weights are padding, the largest of their magnitudes), over the whole tensors."""
    count, largest, real = 0, 0.0, model.config.intermediate_size
    for name, param in model.model.named_parameters():
        dim = mlp_width_dim(name)
        if dim is not None:
            full = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
            pad = full.narrow(dim, real, full.shape[dim] - real)
            count, largest = count + pad.numel(), max(largest, float(pad.abs().max()))
    return count, largest


def _export_run(world: int, ckpt: str) -> dict[str, Any]:
    """3 AdamW steps of a random Llama under tp2 (2 kv heads, one per rank; MLP width 91 padded to 96),
    saved; its predictions and its MLP padding after training."""
    L.seed_everything(SEED, verbose=False)
    model = Llama(
        vocab_size=VOCAB, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=91, **OPTIM
    )
    trainer = quiet_trainer(
        lightning_par.TensorParallelStrategy(tensor_parallel_size=2),
        world,
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(FixedBatches(16, 32, VOCAB), batch_size=4))
    padding = _mlp_padding(model)
    trainer.save_checkpoint(ckpt)
    logits = trainer.predict(model, DataLoader(Rows(_ids(1), labelled=False), batch_size=4))
    return {"logits": logits, "padding": padding}


# ---- two processes ------------------------------------------------------------------------------------------
HF_TWO = [
    ("llama tp2", lambda: lightning_par.TensorParallelStrategy(tensor_parallel_size=2), "llama"),
    (
        "llama tp2 sequence parallel",
        lambda: lightning_par.TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
        "llama",
    ),
    ("llama pp2", lambda: lightning_par.PipelineParallelStrategy(num_microbatches=2), "llama"),
    ("mixtral ep2", lambda: lightning_par.ExpertParallelStrategy(), "mixtral"),
    ("mixtral pp2", lambda: lightning_par.PipelineParallelStrategy(num_microbatches=2), "mixtral"),
]
TRAIN_TWO = [
    ("tp2, kv head replicated", lambda: lightning_par.TensorParallelStrategy(tensor_parallel_size=2), MQA, 1),
    (
        "tp2 sequence parallel, kv head replicated",
        lambda: lightning_par.TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
        MQA,
        1,
    ),
    ("pp2 (half-block cut)", lambda: lightning_par.PipelineParallelStrategy(num_microbatches=2), {}, 1),
    ("mixtral ep2", lambda: lightning_par.ExpertParallelStrategy(), MOE, 2),
]


def _two(rank: int, world: int, dirs: dict[str, str], ckpt: str) -> dict:
    return {
        "hf": [_hf_layout(make(), world, dirs[kind]) for _, make, kind in HF_TWO],
        "train": [_train(make, world, kw) for _, make, kw, _ in TRAIN_TWO],
        "export": _export_run(world, ckpt),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("llama")
    return {kind: (str(root / kind), _save(root / kind, kind)) for kind in ("llama", "mixtral")}


def test_two_processes_hf_parity_training_parity_and_export(checkpoints: dict, tmp_path: Any) -> None:
    dirs = {k: v[0] for k, v in checkpoints.items()}
    ckpt = str(tmp_path / "tp2.ckpt")
    results = run_distributed(_two, 2, dirs, ckpt, init_process_group=False, timeout=280)
    for i, (what, _, kind) in enumerate(HF_TWO):
        _check_hf_layout([r["hf"][i] for r in results], checkpoints[kind][1], what, kind == "mixtral")
    for i, (what, _, kw, dp) in enumerate(TRAIN_TWO):
        got = merge_ranks([r["train"][i] for r in results])
        ref = reference_run(STEPS, BATCH * dp, 0.05, _data(), kw, model_cls=Llama, base_kw=TINY)
        assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=what)

    from lightning_par.checkpoint.hf import export_hf

    out = export_hf(ckpt, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(input_ids=_ids(1)).logits
    for r in results:
        # Zero pads have exactly zero gradients, and AdamW's decay of zero is zero: still exactly zero.
        assert r["export"]["padding"] == (2 * 3 * 5 * 48, 0.0), r["export"]["padding"]
        torch.testing.assert_close(r["export"]["logits"][0], ref, **TOL)


# ---- four processes -----------------------------------------------------------------------------------------
HF_FOUR = [
    (
        "llama tp2 x pp2",
        lambda: lightning_par.HybridParallelStrategy(tensor_parallel_size=2, pipeline_parallel_size=2),
        "llama",
    ),
    (
        "mixtral tp2 x ep2 (dp2)",
        lambda: lightning_par.HybridParallelStrategy(
            tensor_parallel_size=2, data_parallel_size=2, expert_parallel_size=2
        ),
        "mixtral",
    ),
]


def _four(rank: int, world: int, dirs: dict[str, str]) -> list[dict]:
    return [_hf_layout(make(), world, dirs[kind]) for _, make, kind in HF_FOUR]


def test_four_processes_hf_parity(checkpoints: dict) -> None:
    dirs = {k: v[0] for k, v in checkpoints.items()}
    results = run_distributed(_four, 4, dirs, init_process_group=False, timeout=280)
    for i, (what, _, kind) in enumerate(HF_FOUR):
        _check_hf_layout([r[i] for r in results], checkpoints[kind][1], what, kind == "mixtral")


# ---- one process --------------------------------------------------------------------------------------------
def _ours(path: Any, **overrides: Any) -> Llama:
    model = Llama.from_hf(path, **overrides)
    model.configure_model()
    return model.eval()


def _compare(ours: Llama, hf: torch.nn.Module, ids: torch.Tensor) -> None:
    """Logits and loss equal HF's (padded vocabulary rows cut off)."""
    out = _hf(hf, ids)
    with torch.no_grad():
        logits = ours(ids)[..., :VOCAB]
        loss_sum, count = ours._loss({"input_ids": ids, "labels": _labels(ids)})
    assert out.logits.abs().max() > 1.0
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss_sum / count, out.loss, **TOL)


def test_llama_and_mistral_match_hf_in_one_process(tmp_path: Any) -> None:
    hf = _save(tmp_path / "llama")
    ours = _ours(tmp_path / "llama")
    assert ours.config.padded_vocab_size() == 1024 and ours.config.rope_theta == 5000.0
    assert ours.config.padded_intermediate_size == PADDED_MLP and _mlp_padding(ours) == (3 * 3 * 5 * 48, 0.0)
    _compare(ours, hf, _ids())
    # attn.kv rows are [kv head, (k|v), head_dim]: HF's k_proj and v_proj interleaved head by head.
    kv = ours.model.layers["1"].attn.kv.weight.view(2, 2, 8, 48)
    attn = hf.model.layers[1].self_attn
    for g in range(2):
        assert torch.equal(kv[g, 0], attn.k_proj.weight[g * 8 : (g + 1) * 8])
        assert torch.equal(kv[g, 1], attn.v_proj.weight[g * 8 : (g + 1) * 8])

    hf = _save(tmp_path / "mistral", "mistral", seed=3)
    _compare(_ours(tmp_path / "mistral"), hf, _ids(2))
    hf = _save(tmp_path / "tied", tie_word_embeddings=True, seed=4)
    ours = _ours(tmp_path / "tied")
    assert ours.model.head.weight is ours.model.embed.wte.weight
    _compare(ours, hf, _ids(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_backward_matches_hf_autograd(dtype: torch.dtype) -> None:
    """Our RMSNorm's hand-written backward against autograd through HF's ``LlamaRMSNorm``."""
    from lightning_par.models.llama_layers import RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(SEED)
    ours, hf = RMSNorm(48, 1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        hf.weight.copy_(ours.weight)
    x = (3 * torch.randn(7, 5, 48)).to(dtype)
    grad = torch.randn(7, 5, 48)
    results = []
    for norm in (ours, hf):
        xi = x.clone().requires_grad_(True)
        y = norm(xi)
        y.backward(grad)
        results.append((y, xi.grad, norm.weight.grad))
    (y, gx, gw), (y_hf, gx_hf, gw_hf) = results
    assert torch.equal(y, y_hf)  # the forward is HF's arithmetic, op for op
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 rounds the input grad once
    torch.testing.assert_close(gx, gx_hf, **tol)
    torch.testing.assert_close(gw, gw_hf, **TOL)


def test_mixtral_matches_hf_in_one_process_with_its_routing_and_aux_loss(tmp_path: Any) -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf = _save(tmp_path / "saved", "mixtral")
    ours = _ours(tmp_path / "saved")
    assert (ours.config.num_experts, ours.config.moe_top_k) == (4, 2)
    _compare(ours, hf, _ids())
    routed = Routed()
    routed.active = True
    routed.batches.append({"experts": {}})
    for i, moe in ours.model.moe_modules().items():
        moe.router.register_forward_hook(routed._hook(i, moe))
    with torch.no_grad():
        ours(_ids())
    for layer, choices in enumerate(_hf_choices(_hf(hf, _ids(), mixtral=True))):
        assert torch.equal(routed.batches[0]["experts"][layer][0], choices), layer

    # Mixtral's load-balancing loss of one sequence: per layer as HF computes it, added as their mean.
    ids = _ids()[:1]
    ours.train()
    loss_sum, count = ours._loss({"input_ids": ids, "labels": ids})  # (with grad: the aux is kept)
    ours.eval()
    with torch.no_grad():
        token_loss, _ = ours._loss({"input_ids": ids, "labels": ids})
    router_logits = _hf(hf, ids, mixtral=True).router_logits
    per_layer = torch.stack([load_balancing_loss_func((g,), 4, 2) for g in router_logits])
    aux = (loss_sum - token_loss) / count
    torch.testing.assert_close(aux, ours.config.moe_aux_loss_coef * per_layer.mean() * SEQ / count, **TOL)

    # The same weights as one fused tensor per layer (transformers 5's in-memory layout) load the same.
    save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "saved" / "model.safetensors")
    )
    fused = _ours(tmp_path / "saved")
    for name, p in ours.model.state_dict().items():
        assert torch.equal(p, fused.model.state_dict()[name]), name


def test_weight_source_reads_only_the_requested_shard(tmp_path: Any) -> None:
    """Every tp slice equals the same slice of the whole tensor; row slices of q, kv (whole kv heads),
    gate, up, experts and the vocabulary, and column slices of the output projections come back cut."""
    for kind in ("llama", "mixtral"):
        _save(tmp_path / kind, kind)
        model = Llama.from_hf(tmp_path / kind)
        model.configure_model()
        source = llama_weight_source(tmp_path / kind, model.model)
        for name, param in model.model.named_parameters():
            whole = source(name, param.shape)
            assert torch.equal(whole, param.detach()), name
            for dim in range(param.ndim):
                for parts in (2, 3):
                    if param.shape[dim] % parts:
                        continue
                    step = param.shape[dim] // parts
                    for rank in range(parts):
                        got = source(name, param.shape, (dim, rank * step, (rank + 1) * step))
                        cut = dim == 1 and ("wte" in name or "head" in name)
                        if cut:  # (vocabulary tensors are split by rows only)
                            got = got.narrow(dim, rank * step, step)
                        assert torch.equal(got, whole.narrow(dim, rank * step, step)), (kind, name, dim)
            if (dim := mlp_width_dim(name)) is not None:  # a slice wholly in the MLP padding: zeros
                real = SHAPE["intermediate_size"]
                pad = source(name, param.shape, (dim, real, PADDED_MLP))
                assert pad.shape == whole.narrow(dim, real, PADDED_MLP - real).shape and not pad.any(), name
                assert not whole.narrow(dim, real, PADDED_MLP - real).any(), name


def test_export_round_trip_in_one_process(tmp_path: Any) -> None:
    for kind, cls in (("llama", LlamaForCausalLM), ("mixtral", MixtralForCausalLM)):
        hf = _save(tmp_path / kind, kind, tie_word_embeddings=kind == "mixtral")
        ours = _ours(tmp_path / kind)
        out = ours.export_hf(str(tmp_path / f"{kind}_export"))
        extra = EAGER if kind == "mixtral" else {}
        reloaded, info = cls.from_pretrained(out, output_loading_info=True, **extra)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        _compare(ours, reloaded.eval(), _ids())
        back = _ours(out)
        for name, p in ours.model.state_dict().items():
            assert torch.equal(p, back.model.state_dict()[name]), name
        if kind == "llama":  # (transformers 5 holds Mixtral's experts fused in memory: other keys)
            assert set(llama_state_dict_to_hf(ours.state_dict(), ours.config)) == set(hf.state_dict())
            state = {k: v.clone() for k, v in ours.model.state_dict().items()}
            state["layers.1.mlp.proj.weight"][3, PADDED_MLP - 1] = 0.5  # (a pad that is not zero)
            with pytest.raises(
                ValueError, match=r"'layers.1.mlp.proj.weight' has nonzero values in its padded"
            ):
                llama_state_dict_to_hf(state, ours.config)


def test_flops_count_every_matmul_parameter_a_token_meets():
    """At the real MLP width: an odd width's zero padding is no useful work. (The seeded init of a padded
    MLP is the unpadded one's, with zeros after it.)"""
    for kw in ({}, MOE, {"intermediate_size": 45}):
        model = Llama(**{**TINY, **kw}, init_seed=3)
        unpadded = Llama(**{**TINY, **kw}, init_seed=3, pad_intermediate_size_multiple=1)
        model.configure_model()
        unpadded.configure_model()
        real = unpadded.model.state_dict()
        for name, p in model.model.state_dict().items():
            dim, width = mlp_width_dim(name), kw.get("intermediate_size", TINY["intermediate_size"])
            if dim is not None:
                assert not p.narrow(dim, width, p.shape[dim] - width).any(), name
                p = p.narrow(dim, 0, width)
            assert torch.equal(p, real[name]), name
        c, experts = model.config, kw.get("num_experts")
        assert c.padded_intermediate_size == 48
        per_token = 0.0
        for name, p in unpadded.model.named_parameters():
            if p.ndim == 2 and not name.startswith("embed"):
                rows = c.vocab_size if name == "head.weight" else p.shape[0]
                share = c.moe_top_k / experts if ".experts." in name else 1.0
                per_token += share * rows * p.shape[1]
        assert model.matmul_params_per_token() == per_token
        assert model.flops_per_token(16) == 6 * per_token + 12 * c.n_layer * 16 * c.n_embd


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_shapes_and_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match=r"n_head=6 is not a multiple of n_kv_head=4"):
        Llama(n_head=6, n_kv_head=4, n_embd=48)
    model = Llama(n_head=6, n_kv_head=2, n_embd=48, intermediate_size=91)
    with pytest.raises(
        ValueError, match=r"n_kv_head=2 and tensor_parallel_size=3 do not fit.*Valid .*\[1, 2, 6\]"
    ):
        model.check_layout(3, False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide n_head=6"):
        model.check_layout(4, False)
    model.check_layout(2, True)  # split kv heads; the MLP width 91 is padded to 96
    Llama(n_head=8, n_kv_head=2, n_embd=64, intermediate_size=90).check_layout(4, False)  # replicated
    with pytest.raises(
        ValueError,
        match=r"tensor_parallel_size=5 does not divide intermediate_size=90 padded to 96 .*"
        r"pad_intermediate_size_multiple=16.*Valid .*\[1, 2\]",
    ):
        Llama(n_head=10, n_kv_head=10, n_embd=40, intermediate_size=90).check_layout(5, False)
    unpadded = Llama(n_head=4, n_kv_head=4, n_embd=32, intermediate_size=90, pad_intermediate_size_multiple=1)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=4 does not divide intermediate_size=90 padded to 90"
    ):
        unpadded.check_layout(4, False)
    with pytest.raises(ValueError, match=r"pad_intermediate_size_multiple=0 is not valid"):
        Llama(pad_intermediate_size_multiple=0)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("mistral", {"sliding_window": 16}, r"sliding_window=16"),
        ("mixtral", {"sliding_window": 32}, r"sliding_window=32"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'"),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "'dynamic'"),
        ("llama", {"attention_bias": True}, r"attention_bias=True"),
        ("llama", {"mlp_bias": True}, r"mlp_bias=True"),
        ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ("llama", {"head_dim": 16}, r"head_dim=16"),
        ("mixtral", {"router_jitter_noise": 0.1}, r"router_jitter_noise=0.1"),
        ("llama", {"model_type": "qwen2"}, r"'qwen2' checkpoint"),
    ],
)
def test_unsupported_config_is_refused_by_name(tmp_path: Any, kind: str, change: dict, message: str) -> None:
    shapes = {"llama": SHAPE, "mistral": {**SHAPE, "sliding_window": None}, "mixtral": MIXTRAL}
    config = {
        **shapes[kind],
        "model_type": kind,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
    }
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        Llama.from_hf(tmp_path)
    with pytest.raises(ValueError, match=message):
        llama_config_kwargs(tmp_path)
