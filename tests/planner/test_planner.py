"""The planner without training: its counts agree with the code's, the command's outputs, bad input, and
the calibration and timing benchmark in smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_par.models import GPT
from lightning_par.models.gpt_network import GPTConfig, GPTNetwork
from lightning_par.models.llama import Llama
from lightning_par.models.llama_network import LlamaNetwork

import lightning_par
from lightning_par.cli import main
from lightning_par.pipeline.split import plan_stages, split_layers
from lightning_par.planner import Layout, ModelSpec, NoLayoutFits, choose_layout, plan_layouts, predict_time
from lightning_par.planner.cost import _bisect_split, _piece_params, predict_memory, stage_split
from lightning_par.planner.devices import get_device
from lightning_par.planner.search import candidate_layouts

ROOT = Path(__file__).resolve().parents[2]
DENSE = dict(vocab_size=4096, n_layer=8, n_head=8, n_embd=256, block_size=128)
MOE = dict(DENSE, num_experts=4, moe_top_k=2, moe_layer_freq=2)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_counts_agree_with_the_model(cfg):
    spec = ModelSpec.from_any(cfg)
    assert spec.flops_per_token(128) == GPT(**cfg).flops_per_token(128)
    with torch.device("meta"):
        net = GPTNetwork(GPTConfig(**cfg), GPTConfig(**cfg).padded_vocab_size(1))
    unique = {id(p): p.numel() for p in net.parameters()}
    assert spec.num_parameters() == sum(unique.values())


LLAMA = dict(vocab_size=250, n_layer=3, n_head=8, n_kv_head=2, n_embd=64, intermediate_size=91)
MIXTRAL = dict(LLAMA, n_layer=2, n_kv_head=4, num_experts=4, moe_top_k=2, tie_word_embeddings=True)


@pytest.mark.parametrize("cfg", [LLAMA, MIXTRAL], ids=["llama", "mixtral"])
def test_llama_counts_agree_with_the_model(cfg):
    """FLOPs, parameters (padded MLP width and vocabulary) and every tp rank's parameters of a Llama."""
    model = Llama(**cfg)
    spec = ModelSpec.from_any(model)
    assert spec == ModelSpec.from_any(cfg) and spec.llama and spec.ffn == 96
    assert spec.flops_per_token(128) == model.flops_per_token(128)
    with torch.device("meta"):
        net = LlamaNetwork(model.config, model.config.padded_vocab_size(1))
    assert spec.num_parameters() == sum({id(p): p.numel() for p in net.parameters()}.values())
    for tp in (1, 2, 4, 8):  # kv heads split (tp divides them) or replicated (they divide tp)
        local = sum(
            _piece_params(spec, i, half, tp, 1)[0] for i in range(spec.n_layer) for half in ("attn", "mlp")
        )
        rows = spec.kv_rows(tp)[0]
        q, mlp = cfg["n_embd"] ** 2 // tp, 3 * 64 * 96 // tp
        norms = 2 * 64 * spec.n_layer
        experts = 4 * (64 + mlp) if spec.num_experts else mlp
        assert local == norms + spec.n_layer * (2 * q + rows * 64 + experts)
        assert rows == (2 * 8 * spec.kv_heads // tp if spec.kv_heads % tp == 0 else 2 * 8 * spec.kv_heads)


@pytest.mark.parametrize(
    "cfg",
    [dict(DENSE, n_layer=2), dict(MOE, n_layer=2), dict(LLAMA, n_layer=2), MIXTRAL],
    ids=["gpt", "gpt-moe", "llama", "mixtral"],
)
def test_recompute_matmuls_agree_with_the_code(cfg):
    """The matmul FLOPs of a step with and without full recomputation, as torch's FLOP counter sees the
    network run them, equal the cost model's (a device whose only cost is 1 s per matmul FLOP): a dense
    block's recompute stops before its last linear, a MoE block's runs whole."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_par.memory.recompute import apply_activation_checkpointing
    from lightning_par.planner.devices import DeviceSpec, Link

    free = Link(bandwidth=float("inf"), latency=0.0)
    flop = DeviceSpec("flops", 1.0, 1e30, float("inf"), free, free, 1.0, float("inf"), 1.0)
    batch, seq = 2, 16
    counted, predicted = {}, {}
    for mode in (None, "full"):
        torch.manual_seed(0)
        module = (Llama if "n_kv_head" in cfg else GPT)(**cfg)
        module.configure_model()
        apply_activation_checkpointing(module, mode)
        counter = FlopCounterMode(display=False)
        with counter:
            out = module.model(torch.randint(0, cfg["vocab_size"], (batch, seq)))
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        counted[mode] = counter.get_total_flops()
        spec, layout = ModelSpec.from_any(module), Layout(1, 1, 1, micro_batch_size=batch, recompute=mode)
        predicted[mode] = predict_time(
            spec, layout, seq, "32-true", flop, 1, predict_memory(spec, layout, seq, "32-true")
        )["step_s"]
    assert predicted[None] == pytest.approx(counted[None], rel=1e-9)
    assert predicted["full"] - predicted[None] == pytest.approx(counted["full"] - counted[None], rel=1e-9)
    assert counted["full"] > counted[None]


def test_llama_from_configs_and_hf(tmp_path):
    spec = ModelSpec.from_file(ROOT / "configs" / "llama_tp_pp.yaml")
    assert (spec.family, spec.n_kv_head, spec.intermediate_size, spec.tie_embeddings) == (
        "llama",
        2,
        688,
        False,
    )
    assert spec.block_size == 128 and spec.position_params == 0 and not spec.bias
    mixtral = ModelSpec.from_file(ROOT / "configs" / "mixtral_ep.yaml")
    assert (mixtral.num_experts, mixtral.moe_layers) == (8, [0, 1, 2, 3])
    hf = dict(
        model_type="mixtral",
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    spec = ModelSpec.from_file(tmp_path)
    assert spec.num_parameters() == 46_702_792_704  # Mixtral 8x7B
    assert not spec.tie_embeddings and len(spec.moe_layers) == 32
    assert ModelSpec.from_dict({**hf, "model_type": "mistral", "num_local_experts": None}).num_experts == 0
    with pytest.raises(ValueError, match=r"n_kv_head=3 is not valid: it must divide n_head=32"):
        ModelSpec.from_dict({**hf, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"intermediate_size=100 is not valid for family='gpt'"):
        ModelSpec(2, 64, 4, 100, intermediate_size=100)
    odd = ModelSpec.from_any(dict(LLAMA, n_head=12, n_kv_head=4, n_embd=96))
    assert "n_kv_head=4 and tensor_parallel_size=6" in str(odd.tp_error(6)) and odd.tp_error(4) is None
    small = ModelSpec.from_any(dict(LLAMA, n_kv_head=1))
    layouts = {lay.tp for lay in candidate_layouts(small, 8, 8, 8)}
    assert layouts == {1, 2, 4, 8}  # one kv head replicated on every rank; 96 splits over 8


@pytest.mark.parametrize(
    "layout",
    [
        Layout(1, 2, 1),
        Layout(2, 2, 1),
        Layout(1, 4, 1),
        Layout(1, 2, 1, schedule="interleaved_1f1b", virtual=2),
    ],
    ids=["pp2", "tp2 pp2", "pp4", "pp2 v2"],
)
def test_stage_split_matches_plan_stages(layout):
    """The planner's stages hold the halves ``plan_stages`` gives the meta network."""
    spec = ModelSpec.from_any(DENSE)
    cfg = GPTConfig(**DENSE)
    with torch.device("meta"):
        net = GPTNetwork(cfg, cfg.padded_vocab_size(layout.tp))
    ours = stage_split(spec, layout)
    virtual = layout.virtual if layout.virtual > 1 else None
    for rank in range(layout.pp):
        plan = plan_stages(net, layout.schedule, layout.pp, rank, virtual)
        for s in plan.stages:
            halves = {}
            for layer, half in ours[s]:
                halves.setdefault(layer, []).append(half)
            assert list(halves) == plan.layers[s]
            cut = {i: tuple(h) for i, h in halves.items() if len(h) == 1}
            assert cut == plan.parts.get(s, {})


def test_bubble_and_microbatches_move_the_prediction_the_right_way():
    spec, dev = ModelSpec.from_any(DENSE), get_device("a100-80gb")

    def step(**kw):
        lay = Layout(1, 4, 1, **kw)
        mem = predict_memory(spec, lay, 128, "bf16-mixed")
        return predict_time(spec, lay, 128, "bf16-mixed", dev, 8, mem), mem

    t4, m4 = step(num_microbatches=4)
    t16, m16 = step(num_microbatches=16)
    g16, mg16 = step(num_microbatches=16, schedule="gpipe")
    assert t4["bubble_s"] / t4["compute_s"] > t16["bubble_s"] / t16["compute_s"]  # (p - 1) / (v m)
    # Unequal stages (the head makes the last the slowest): the bubble is the other stages' one pass
    # each, less than (p - 1) passes of the slowest; interleaving (v = 2) halves it.
    for t in (t4, t16):
        assert 0 < t["bubble_s"] < 3 * t["per_microbatch_s"]
    i16, _ = step(num_microbatches=16, schedule="interleaved_1f1b", virtual=2)
    assert i16["bubble_s"] < 0.75 * t16["bubble_s"]
    assert mg16[0]["activations_peak"] == pytest.approx(
        4 * m16[0]["activations_peak"]
    )  # 16 against 4 in flight
    assert m16[3]["activations_peak"] < m16[0]["activations_peak"]  # the last rank keeps one micro-batch


def test_bisection_split_finds_the_same_bottleneck():
    """Past a few hundred stages the planner bisects instead of ``split_layers``' quadratic search."""
    costs = [float(c) for c in ([3, 5] * 20)]

    def worst(split: list[list[int]]) -> float:
        last = len(split) - 1
        return max(sum(costs[j] for j in idx) + (6.0 if i == last else 0.0) for i, idx in enumerate(split))

    for stages in (2, 3, 7, 16, 40):
        exact = split_layers(costs, stages, 0.0, 6.0)
        fast = _bisect_split(costs, stages, 6.0)
        assert [j for idx in fast for j in idx] == list(range(len(costs))) and all(fast)
        assert worst(fast) == pytest.approx(worst(exact)), stages


def test_time_components_follow_the_layout():
    """Recomputation adds a forward, the distributed optimizer an all-gather, a tp group across nodes pays
    the network instead of NVLink."""
    spec, dev = (
        ModelSpec(n_layer=8, n_embd=4096, n_head=32, vocab_size=51200, block_size=2048),
        get_device("h100-80gb"),
    )

    def predict(layout, per_node=8):
        mem = predict_memory(spec, layout, 2048, "bf16-mixed")
        return predict_time(spec, layout, 2048, "bf16-mixed", dev, per_node, mem)

    base = predict(Layout(8, 1, 2, micro_batch_size=2))
    full = predict(Layout(8, 1, 2, micro_batch_size=2, recompute="full"))
    assert full["compute_s"] > base["compute_s"] * 1.2 and full["comm_exposed_s"] > base["comm_exposed_s"]
    distopt = predict(Layout(8, 1, 2, micro_batch_size=2, distributed_optimizer=True))
    assert (
        distopt["dp_comm_exposed_s"] > base["dp_comm_exposed_s"]
        and distopt["optimizer_s"] < base["optimizer_s"]
    )
    assert (
        predict(Layout(8, 1, 2, micro_batch_size=2), per_node=4)["comm_exposed_s"]
        > 2 * base["comm_exposed_s"]  # (NDR is 9x slower than NVLink 4; part hides behind matmuls)
    )


def test_cpu_rules_no_overlap_shared_cores_and_framework_time():
    """A CPU profile: gloo's collectives take the cores backward would hide them behind (no overlap);
    more ranks than cores share them (the step is at least all ranks' work over the cores); the
    framework's measured per-step and per-micro-batch times are added."""
    from dataclasses import replace

    from lightning_par.planner.devices import DeviceSpec, Link

    link = Link(bandwidth=1e9, latency=1e-3)
    cpu = DeviceSpec("cpu", 80e9, 16e9, 10e9, link, link, 1.0, 0.9, 1.0, compute_slots=2)
    spec = ModelSpec(n_layer=4, n_embd=256, n_head=8, vocab_size=4096, block_size=128)

    def predict(layout, dev):
        mem = predict_memory(spec, layout, 128, "32-true")
        return predict_time(spec, layout, 128, "32-true", dev, 2, mem)

    dp2 = Layout(1, 1, 2, micro_batch_size=4)
    overlapped, exposed = predict(dp2, cpu), predict(dp2, replace(cpu, comm_overlap=False))
    grads = predict_memory(spec, dp2, 128, "32-true")[0]["grads"]
    assert exposed["dp_comm_exposed_s"] == pytest.approx(link.time("all_reduce", grads, 2))
    assert overlapped["dp_comm_exposed_s"] <= exposed["dp_comm_exposed_s"]
    # pp4 on 2 cores: the bubble's idle ranks leave their cores to others, so the step is the four
    # ranks' work over two cores (plus what is exposed), not each rank's critical path slowed twice.
    pp4 = Layout(1, 4, 1, micro_batch_size=1, num_microbatches=8)
    shared = predict(pp4, cpu)
    alone = predict(pp4, replace(cpu, compute_slots=4))
    assert alone["step_s"] < shared["step_s"] < 2 * alone["step_s"] and shared["bubble_s"] == 0
    slow = predict(pp4, replace(cpu, compute_slots=4, step_overhead=0.01, action_overhead=0.001))
    assert slow["step_s"] == pytest.approx(alone["step_s"] + 0.01 + 2 * 8 * 0.001)


def test_collectives_between_compute_pay_the_measured_wait():
    """Each tp collective and pp transfer of tp2 x pp2 costs the wait measured after a stretch of
    compute instead of the back-to-back latency: per step, m times the last stage's 11 (its two blocks'
    forward and backward reductions and the head's three) plus the 2 (m + p - 1) pp transfers. With
    more ranks than cores the oversubscribed waits apply, with one rank per core the others. dp's
    reduction after the step is not between compute and keeps its latency."""
    from dataclasses import replace

    from lightning_par.planner.devices import DeviceSpec, Link

    link = Link(bandwidth=1e9, latency=1e-3)
    cpu = DeviceSpec("cpu", 80e9, 16e9, 10e9, link, link, 1.0, 0.9, 1.0, compute_slots=2, comm_overlap=False)
    spec = ModelSpec(n_layer=4, n_embd=256, n_head=8, vocab_size=4096, block_size=128)

    def flat(wait):
        return (("all_reduce", 1e-3, wait), ("all_reduce", 4e-3, wait), ("p2p", 1e-3, wait))

    waits = replace(cpu, interleaved=flat(2e-3), oversubscribed_interleaved=flat(4e-3))

    def predict(layout, dev, world):
        mem = predict_memory(spec, layout, 128, "32-true")
        return predict_time(spec, layout, 128, "32-true", dev, world, mem)

    tp2pp2 = Layout(2, 2, 1, micro_batch_size=1, num_microbatches=8)
    calls = 8 * 11 + 2 * (8 + 2 - 1)
    for slots, extra in ((2, 3e-3), (4, 1e-3)):
        before = predict(tp2pp2, replace(cpu, compute_slots=slots), 4)
        after = predict(tp2pp2, replace(waits, compute_slots=slots), 4)
        assert after["comm_exposed_s"] - before["comm_exposed_s"] == pytest.approx(calls * extra)
    dp4 = Layout(1, 1, 4, micro_batch_size=2)
    assert predict(dp4, waits, 4) == predict(dp4, cpu, 4)
    # Between the two measured stretches the wait is interpolated; outside them it is the nearest's.
    curve = replace(
        cpu, interleaved=(("all_reduce", 1e-3, 1e-3), ("all_reduce", 4e-3, 2.5e-3), ("p2p", 1e-3, 2e-3))
    )
    assert curve.wait("all_reduce", 2.5e-3) == pytest.approx(1.75e-3)
    assert curve.wait("reduce_scatter", 9e-3) == 2.5e-3 and curve.wait("all_gather", 1e-4) == 1e-3
    assert curve.wait("p2p", 5e-3) == 2e-3 and curve.wait("p2p", 1e-3, oversubscribed=True) == 0.0


def test_choose_layout_gives_strategy_arguments():
    plan = choose_layout(ModelSpec.from_any(DENSE), 16, 8, "h100-80gb", global_batch_size=64, seq_len=128)
    kwargs = plan.strategy_kwargs()
    assert plan.tensor_parallel_size * plan.pipeline_parallel_size * plan.data_parallel_size == 16
    assert set(kwargs) == {
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "expert_parallel_size",
        "sequence_parallel",
        "pipeline_schedule",
        "virtual_pipeline_size",
        "num_microbatches",
        "distributed_optimizer",
        "activation_checkpointing",
    }
    lightning_par.HybridParallelStrategy(**kwargs)  # the strategy accepts them
    p = plan.prediction
    assert p["fits"] and p["step_s"] == pytest.approx(p["compute_s"] + p["comm_exposed_s"] + p["bubble_s"])
    assert 0 < p["mfu"] < 1 and p["tokens_per_s"] == pytest.approx(64 * 128 / p["step_s"])


def test_plan_command_table_json_and_explain(capsys, tmp_path):
    base = [
        "plan",
        "--gpus",
        "64",
        "--gpus-per-node",
        "8",
        "--gpu",
        "h100-80gb",
        "--global-batch-size",
        "512",
    ]
    main([*base, "--config", str(ROOT / "configs/gpt_tp_pp.yaml"), "--seq-len", "2048", "--explain"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "step ms" in lines[0] and "MFU %" in lines[0] and len([r for r in lines[2:12] if r.strip()]) == 10
    assert "is predicted" in out and "per step" in out
    hf = tmp_path / "config.json"
    hf.write_text(
        json.dumps({"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024})
    )
    main([*base, "--hf-config", str(hf), "--json", "--top", "3"])
    data = json.loads(capsys.readouterr().out)
    assert len(data["plans"]) == 3
    first = data["plans"][0]
    assert set(first["prediction"]["memory"]) >= {"params", "grads", "optimizer", "activations_peak"}
    assert first["strategy_kwargs"]["tensor_parallel_size"] == first["tensor_parallel_size"]
    steps = [p["prediction"]["step_s"] for p in data["plans"]]
    assert steps == sorted(steps)
    main([*base, "--n-layer", "4", "--n-embd", "256", "--n-head", "4", "--vocab-size", "4096", "--top", "1"])
    assert "tp" in capsys.readouterr().out


def test_bad_input_is_named(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "plan",
                "--gpus",
                "12",
                "--gpus-per-node",
                "8",
                "--n-layer",
                "4",
                "--n-embd",
                "256",
                "--n-head",
                "4",
                "--vocab-size",
                "100",
            ]
        )
    assert "gpus=12 cannot form a mesh of nodes of gpus_per_node=8" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"device='tpu' is not known; valid presets: \['a100-40gb'"):
        plan_layouts(DENSE, 8, 8, "tpu")
    huge = ModelSpec(n_layer=96, n_embd=16384, n_head=128, vocab_size=51200, block_size=2048)
    with pytest.raises(
        NoLayoutFits, match=r"no layout fits: the smallest needs [\d.]+ GiB per GPU .* Use more GPUs"
    ):
        plan_layouts(huge, 8, 8, "a100-40gb", global_batch_size=8)
    with pytest.raises(ValueError, match=r"seq_len=0 is not valid: it must be an integer >= 1"):
        plan_layouts(DENSE, 8, 8, seq_len=0)
    with pytest.raises(ValueError, match=r"global_batch_size=0 is not valid: it must be an integer >= 1"):
        plan_layouts(DENSE, 8, 8, global_batch_size=0)


def test_calibrate_and_the_timing_benchmark_smoke(tmp_path, capsys):
    profile = tmp_path / "cpu.json"
    main(
        [
            "plan",
            "--calibrate",
            str(profile),
            "--calibrate-repeat",
            "2",
            "--gpus",
            "2",
            "--gpus-per-node",
            "2",
            "--n-layer",
            "2",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--vocab-size",
            "256",
            "--block-size",
            "16",
            "--top",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert f"wrote {profile}" in out and "step ms" in out
    dev = get_device(str(profile))
    assert dev.compute_slots and dev.peak_flops > 0 and set(dev.intra_node.per_op) >= {"all_reduce", "p2p"}
    assert not dev.comm_overlap and dev.optimizer_bandwidth > 0 and dev.step_overhead >= 0
    assert dev.action_overhead >= 0 and (dev.oversubscribed is not None) == (dev.compute_slots <= 4)
    # The waits of pairs between compute: both ops after both stretches, and oversubscribed if measured.
    pairs = {(op, c) for op in ("all_reduce", "p2p") for c in (1e-3, 4e-3)}
    for table in (dev.interleaved, dev.oversubscribed_interleaved if dev.oversubscribed else ()):
        assert {(op, c) for op, c, _ in table} == pairs and all(0 < w < 1 for _, _, w in table)
    bw, latency = dev.intra_node.per_op["all_reduce"]
    assert bw > 0 and 0 < latency < 1
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "planner_time.py"), "--smoke", "--profile", str(profile)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "spearman (2 processes, 2 layouts)" in proc.stdout and "planner's pick for 2 processes" in proc.stdout
    )


def test_calibrations_merge_into_their_median_profile():
    from dataclasses import replace

    from lightning_par.planner import Link, merge_profiles

    base = get_device("a100-80gb")

    def profile(flops: float, adamw: float, ar: tuple[float, float], over: float) -> object:
        link = Link(bandwidth=ar[0], latency=ar[1], measured=(("all_reduce", *ar), ("p2p", 2 * ar[0], ar[1])))
        return replace(
            base,
            peak_flops=flops,
            optimizer_bandwidth=adamw,
            intra_node=link,
            inter_node=link,
            oversubscribed=Link(bandwidth=over, latency=1e-3),
            oversubscribed_interleaved=(("all_reduce", 1e-3, over / 1e11), ("p2p", 1e-3, 2e-3)),
            compute_slots=2,
            source="calibrated",
        )

    merged = merge_profiles(
        [
            profile(80e9, 4e9, (1.0e9, 6e-3), 5e8),
            profile(60e9, 10.5e9, (1.5e9, 0.8e-3), 2e8),
            profile(70e9, 6e9, (1.2e9, 2e-3), 3e8),
        ]
    )
    assert merged.peak_flops == 70e9 and merged.optimizer_bandwidth == 6e9
    assert merged.intra_node.per_op == {"all_reduce": (1.2e9, 2e-3), "p2p": (2.4e9, 2e-3)}
    assert merged.oversubscribed == Link(bandwidth=3e8, latency=1e-3, measured=())
    assert merged.oversubscribed_interleaved == (("all_reduce", 1e-3, 3e-3), ("p2p", 1e-3, 2e-3))
    assert merged.interleaved == ()
    assert (
        merged.compute_slots == 2
        and merged.source == "calibrated"
        and merged.memory_bytes == base.memory_bytes
    )
    with pytest.raises(ValueError, match=r"profiles=\[\] is not valid"):
        merge_profiles([])
