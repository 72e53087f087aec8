"""Pipeline parallel: stage split, schedules, parity with one process, shapes, memory, timeline, errors.

Each spawned process group runs many checks (process start is the slow part on 2 cores).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_par.callbacks import PipelineTimeline
from lightning_par.models import GPT
from lightning_par.models.blocks import Block
from lightning_par.models.gpt import GPTConfig, GPTNetwork
from torch.utils.data import DataLoader

import lightning_par
from lightning_par.distributed.layout import ParallelLayout
from lightning_par.initialization import fill_parameters
from lightning_par.pipeline.schedules import SCHEDULES, stage_placement
from lightning_par.pipeline.split import StagePlan, plan_stages, plan_views, prune_network, split_layers
from lightning_par.pipeline.timeline import bubble_theory
from tests.harness import run_distributed
from tests.parity import (
    SEED,
    TINY,
    FixedBatches,
    assert_same_run,
    merge_ranks,
    quiet_trainer,
    reference_run,
    save_tiny_gpt2,
    trainer_run,
)

# Same bar as the tensor-parallel parity tests: microbatch sums and per-stage matmuls add in another
# order than one process does, so fp32 round-off (amplified a little by Adam on tiny gradients).
RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, MICRO = 3, 8, 4
FOUR_LAYERS = {"n_layer": 4}


def _data() -> FixedBatches:
    return FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)


# ---- no processes --------------------------------------------------------------------------------------
def test_split_layers_balances_cost_and_takes_explicit_boundaries():
    # Equal layers, a head worth 1.5 layers on the last stage: the last stage gets fewer layers.
    assert split_layers([1.0] * 8, 2, 0.0, 1.5) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert split_layers([1.0] * 8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_layers([1.0] * 4, 4, 0.0, 10.0) == [[0], [1], [2], [3]]  # at least one layer each
    assert split_layers([1.0] * 6, 3, boundaries=[1, 5]) == [[0], [1, 2, 3, 4], [5]]
    with pytest.raises(ValueError, match=r"pipeline_stage_boundaries=\[3, 2\] is not valid"):
        split_layers([1.0] * 6, 3, boundaries=[3, 2])
    with pytest.raises(ValueError, match="5 pipeline stages cannot split 4 layers"):
        split_layers([1.0] * 4, 5)


def test_stage_placement_looped_and_v_shaped():
    assert stage_placement("1f1b", 4, None) == [[0], [1], [2], [3]]
    assert stage_placement("interleaved_1f1b", 2, 2) == [[0, 2], [1, 3]]
    assert stage_placement("interleaved_zero_bubble", 2, 3) == [[0, 2, 4], [1, 3, 5]]
    assert stage_placement("zbv", 2, None) == [[0, 3], [1, 2]]  # V: the first and last stage on rank 0


def test_gpt_stage_plan_counts_the_head_and_keeps_global_names():
    with torch.device("meta"):
        net = GPTNetwork(GPTConfig(vocab_size=4096, n_layer=8, n_embd=256, n_head=4), 4096)
    # The head (4096 x 256) costs 1.33 layers (12 x 256^2 each). In whole layers 5 + 0 against 3 + 1.33 is
    # the best split; cut between attention (4 x 256^2) and MLP (8 x 256^2) the stages are 4 layers and
    # the attention of layer 4 (4.33) against the MLP of layer 4, 3 layers and the head (4.33 + 0.33).
    plan = plan_stages(net, "1f1b", 2, 1, None)
    assert plan.layers == {0: [0, 1, 2, 3, 4], 1: [4, 5, 6, 7]} and plan.stages == (1,)
    assert plan.parts == {0: {4: ("attn",)}, 1: {4: ("mlp",)}}
    assert plan.owned_parts() == {4: {"mlp"}, 5: None, 6: None, 7: None}
    assert plan.keeps("layers.4.mlp.fc.weight") and plan.keeps("layers.4.ln_2.bias")
    assert not plan.keeps("layers.4.attn.qkv.weight") and not plan.keeps("layers.4.ln_1.weight")
    assert plan.has_last and not plan.has_first
    # Explicit boundaries are whole layers.
    plan = plan_stages(net, "1f1b", 2, 1, None, boundaries=[5])
    assert plan.layers == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7]} and not plan.parts
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=9 is more than the model's 8 layers"):
        plan_stages(net, "1f1b", 9, 0, None)
    with pytest.raises(ValueError, match=r"virtual_pipeline_size=3 .* do not divide the model's 8 layers"):
        plan_stages(net, "interleaved_1f1b", 2, 0, 3)


def test_stages_cut_inside_a_layer_compose_to_the_whole_network():
    """Every rank's pruned network and stage views, run stage after stage, give the unsplit network's
    logits; a layer's halves may sit on two ranks or on two stages of one rank (a V-shaped placement)."""
    cfg = GPTConfig(**{**TINY, "n_layer": 4, "dropout": 0.0})
    net = GPTNetwork(cfg, cfg.padded_vocab_size(1))
    fill_parameters(net, net.random_init_source(0))
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(0))
    expected = net(ids)
    same_rank = [  # stages 1 and 2 on rank 1 share layer 2, cut between attention and MLP
        StagePlan(4, stages, {0: [0, 1], 1: [2], 2: [2, 3], 3: [3]}, cuts, Block.PARTS)
        for stages in ((0, 3), (1, 2))
        for cuts in ({1: {2: ("attn",)}, 2: {2: ("mlp",), 3: ("attn",)}, 3: {3: ("mlp",)}},)
    ]
    for plans in ([plan_stages(net, "1f1b", 2, r, None) for r in range(2)], same_rank):
        assert any(plan.parts for plan in plans)
        views = {}
        names = set()
        for plan in plans:
            rank_net = copy.deepcopy(net)
            prune_network(rank_net, plan)
            names |= {n for n, _ in rank_net.named_parameters(remove_duplicate=False)}
            assert all(plan.keeps(n) for n, _ in rank_net.named_parameters(remove_duplicate=False))
            views.update(plan_views(rank_net, plan))
        assert names == {n for n, _ in net.named_parameters(remove_duplicate=False)}
        x = ids
        for s in range(plans[0].num_stages):
            x = views[s](x)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_bad_pipeline_settings_raise_at_construction():
    P = lightning_par.HybridParallelStrategy
    with pytest.raises(ValueError, match=r"pipeline_schedule='pipedream' is not known; valid choices: \["):
        P(pipeline_parallel_size=2, pipeline_schedule="pipedream")
    with pytest.raises(ValueError, match=r"num_microbatches=1 is fewer than the 2 pipeline stages"):
        L.Trainer(accelerator="cpu", devices=2, strategy=P(pipeline_parallel_size=2, num_microbatches=1))
    with pytest.raises(ValueError, match=r"virtual_pipeline_size=2 needs an interleaved schedule"):
        P(pipeline_parallel_size=2, pipeline_schedule="1f1b", virtual_pipeline_size=2)
    with pytest.raises(ValueError, match=r"virtual_pipeline_size=3 does not fit pipeline_schedule='zbv'"):
        P(pipeline_parallel_size=2, pipeline_schedule="zbv", virtual_pipeline_size=3)
    with pytest.raises(ValueError, match=r"num_microbatches=0 is not valid"):
        P(pipeline_parallel_size=2, num_microbatches=0)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 does not divide the number of processes"):
        L.Trainer(accelerator="cpu", devices=4, strategy=P(pipeline_parallel_size=3))


def test_presets_split_devices_into_tp_and_pp():
    def sizes(strategy, devices):
        t = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)
        return t.strategy.layout.tp, t.strategy.layout.pp, t.strategy.layout.dp

    assert sizes("tp_pp", 4) == (2, 2, 1)
    assert sizes("tp_pp", 8) == (4, 2, 1)
    assert sizes("pp", 2) == (1, 2, 1)
    assert sizes("pp", 4) == (1, 4, 1)
    assert isinstance(
        L.Trainer(accelerator="cpu", devices=2, strategy="pp").strategy,
        lightning_par.PipelineParallelStrategy,
    )
    layout = ParallelLayout.from_world_size(16, None, None, None, devices_per_node=8)
    assert (layout.tp, layout.pp) == (8, 2)
    layout = ParallelLayout.from_world_size(32, None, None, None, devices_per_node=8)
    assert (layout.tp, layout.pp) == (8, 4)


def test_bubble_theory():
    assert bubble_theory(2, 8) == pytest.approx(1 / 9)
    assert bubble_theory(2, 8, 2) == pytest.approx(1 / 17)


# ---- pp = 2: every schedule, shapes, memory, timeline, errors --------------------------------------
class InFlight:
    """Counts, per stage process, how many microbatches have saved activations alive at once."""

    def __init__(self) -> None:
        self.current = -1
        self.live: dict[int, int] = {}
        self.peak = 0

    def hooks(self):
        tracker = self

        class Saved:
            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.mb = t, tracker.current
                if self.mb >= 0:
                    tracker.live[self.mb] = tracker.live.get(self.mb, 0) + 1
                    tracker.peak = max(tracker.peak, sum(1 for n in tracker.live.values() if n > 0))

            def __del__(self) -> None:
                if self.mb >= 0:
                    tracker.live[self.mb] -= 1

        return torch.autograd.graph.saved_tensors_hooks(lambda t: Saved(t), lambda s: s.t)


def _count_in_flight(world: int, schedule: str, micro: int) -> int:
    from torch.distributed.pipelining import PipelineStage

    tracker = InFlight()
    original = PipelineStage.forward_one_chunk

    def forward_one_chunk(self, chunk_id, *args, **kwargs):
        tracker.current = chunk_id
        try:
            return original(self, chunk_id, *args, **kwargs)
        finally:
            tracker.current = -1

    PipelineStage.forward_one_chunk = forward_one_chunk
    try:
        strategy = lightning_par.PipelineParallelStrategy(pipeline_schedule=schedule, num_microbatches=micro)
        L.seed_everything(SEED, verbose=False)
        trainer = quiet_trainer(strategy, world, max_steps=2)
        with tracker.hooks():
            trainer.fit(GPT(**TINY), DataLoader(_data(), batch_size=micro))
    finally:
        PipelineStage.forward_one_chunk = original
    return tracker.peak


def _shapes_and_outputs(rank: int, world: int) -> dict:
    """Train at seq 16 with a short last batch, validate at seq 8, predict: all on one pp=2 model."""
    out: dict = {}
    L.seed_everything(SEED, verbose=False)
    model = GPT(**{**TINY, **FOUR_LAYERS}, learning_rate=1e-3)
    trainer = quiet_trainer(
        lightning_par.PipelineParallelStrategy(num_microbatches=4),
        world,
        max_epochs=1,
        use_distributed_sampler=False,
    )
    # 10 rows, batch 4: batches of 4, 4 and 2 (the last short: padded to 4 rows of ignored labels).
    trainer.fit(model, DataLoader(FixedBatches(10, 16, TINY["vocab_size"], seed=3), batch_size=4))
    out["steps"] = trainer.global_step
    val_data = FixedBatches(6, 8, TINY["vocab_size"], seed=4)
    out["val"] = trainer.validate(model, DataLoader(val_data, batch_size=4), verbose=False)[0]
    out["test"] = trainer.test(model, DataLoader(val_data, batch_size=4), verbose=False)[0]
    preds = trainer.predict(model, DataLoader([val_data[i]["input_ids"] for i in range(6)], batch_size=4))
    out["pred"] = [p.detach().clone() for p in preds]
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["state_keys"] = sorted(model.state_dict().keys())
    out["sample"] = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, top_k=1)
    return out


def _pp2_checks(rank: int, world: int, schedules: list[str], tmp: str) -> dict:
    out: dict = {"parity": {}}
    for schedule in schedules:
        strategy = lightning_par.PipelineParallelStrategy(pipeline_schedule=schedule, num_microbatches=MICRO)
        out["parity"][schedule] = trainer_run(strategy, world, STEPS, BATCH, 0.05, _data(), FOUR_LAYERS)
    # An explicit split: layer 0 alone on the first stage, layers 1-3 with the head on the last.
    strategy = lightning_par.PipelineParallelStrategy(num_microbatches=MICRO, pipeline_stage_boundaries=[1])
    out["parity"]["boundaries"] = trainer_run(strategy, world, STEPS, BATCH, 0.05, _data(), FOUR_LAYERS)
    out["boundary_layers"] = sorted(
        {int(n.split(".")[2]) for n in out["parity"]["boundaries"]["params"] if ".layers." in n}
    )
    out["shapes"] = _shapes_and_outputs(rank, world)
    out["in_flight"] = {s: _count_in_flight(world, s, 8) for s in ("1f1b", "gpipe")}

    # Timeline: the second step's per-stage events, a PNG and W&B image + bubble metrics.
    os.environ["WANDB_MODE"] = "offline"
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="t", save_dir=tmp, offline=True) if rank == 0 else False
    strategy = lightning_par.PipelineParallelStrategy(num_microbatches=4)
    timeline = PipelineTimeline()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2,
        default_root_dir=tmp,
        callbacks=[timeline],
    )
    trainer.fit(GPT(**TINY), DataLoader(_data(), batch_size=4))
    out["timeline"] = timeline.summary

    # Bad input, each before any step: accumulation with pp, a batch that does not split.
    errors = {}
    for name, kw, batch in (
        ("accumulate", {"accumulate_grad_batches": 2}, 4),
        ("batch", {}, 6),
    ):
        try:
            quiet_trainer(
                lightning_par.PipelineParallelStrategy(num_microbatches=4), world, max_steps=1, **kw
            ).fit(GPT(**TINY), DataLoader(_data(), batch_size=batch))
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors

    return out


def _reference_outputs() -> dict:
    """The shapes run in one process: the same three steps, validation and predictions."""
    L.seed_everything(SEED, verbose=False)
    model = GPT(**{**TINY, **FOUR_LAYERS}, learning_rate=1e-3)
    trainer = quiet_trainer("auto", 1, max_epochs=1, use_distributed_sampler=False)
    trainer.fit(model, DataLoader(FixedBatches(10, 16, TINY["vocab_size"], seed=3), batch_size=4))
    val_data = FixedBatches(6, 8, TINY["vocab_size"], seed=4)
    val = trainer.validate(model, DataLoader(val_data, batch_size=4), verbose=False)[0]
    preds = trainer.predict(model, DataLoader([val_data[i]["input_ids"] for i in range(6)], batch_size=4))
    return {
        "val": val,
        "pred": preds,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state_keys": sorted(model.state_dict().keys()),
        "sample": model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, top_k=1),
    }


def test_pp2_every_schedule_shapes_memory_timeline(tmp_path):
    schedules = list(SCHEDULES)
    results = run_distributed(_pp2_checks, 2, schedules, str(tmp_path), init_process_group=False, timeout=240)

    # 1. Parity: loss, gradients before and after clipping, grad norm and weights, for every schedule
    #    (and an explicit stage split). The logged loss and the norm are the same on both stages.
    assert results[0]["boundary_layers"] == [0] and results[1]["boundary_layers"] == [1, 2, 3]
    for schedule in [*schedules, "boundaries"]:
        assert results[0]["parity"][schedule]["losses"] == results[1]["parity"][schedule]["losses"]
        assert results[0]["parity"][schedule]["norms"] == results[1]["parity"][schedule]["norms"]
        got = merge_ranks([r["parity"][schedule] for r in results])
        ref = reference_run(STEPS, BATCH, 0.05, _data(), FOUR_LAYERS)
        assert ref["norms"][0] > 0.05, "clipping must be active for the norm to be tested"
        assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=f"pp=2 {schedule}")

    # 2. Shapes: a short last batch, validation at another sequence length, predict; all as one process.
    ref = _reference_outputs()
    shapes = [r["shapes"] for r in results]
    assert shapes[0]["steps"] == 3
    params = merge_ranks(
        [{"losses": [], "norms": [], "grads": [], "clipped": [], "params": s["params"]} for s in shapes]
    )
    for name, value in ref["params"].items():
        torch.testing.assert_close(params["params"][name], value, rtol=RTOL, atol=1e-5, msg=name)
    for s in shapes:  # identical on both stages
        assert s["val"]["val/loss"] == pytest.approx(ref["val"]["val/loss"], rel=1e-5)
        assert s["test"]["test/loss"] == pytest.approx(ref["val"]["val/loss"], rel=1e-5)
        for p, q in zip(s["pred"], ref["pred"], strict=True):
            torch.testing.assert_close(p, q[..., : p.shape[-1]], rtol=1e-5, atol=1e-5)
        assert torch.equal(s["sample"], ref["sample"])
    # 3. Checkpoint names: the union over stages is the one-process set (layers keep global indices).
    assert sorted(set(shapes[0]["state_keys"]) | set(shapes[1]["state_keys"])) == ref["state_keys"]
    assert not set(shapes[0]["state_keys"]) & {k for k in shapes[1]["state_keys"] if ".layers." in k}

    # 4. Memory: 1F1B keeps at most pp microbatches' activations on a stage, GPipe all of them.
    assert results[0]["in_flight"]["1f1b"] == 2 and results[1]["in_flight"]["1f1b"] == 1
    assert results[0]["in_flight"]["gpipe"] == 8

    # 5. Timeline: both ranks got the same summary; the PNG exists and went to W&B with the bubble.
    t = results[0]["timeline"]
    assert t is not None and results[1]["timeline"]["bubble_measured"] == t["bubble_measured"]
    assert t["bubble_theory"] == pytest.approx(1 / 5)
    assert 0.0 < t["bubble_measured"] < 1.0
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in t["ranks"])
    assert Path(t["png"]).stat().st_size > 1000
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    log = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"pipeline/timeline" in log and b"pipeline/bubble_measured" in log
    assert list(run_dir.rglob("media/images/pipeline/timeline*.png"))

    # 6. Bad input named, before any step.
    errors = results[0]["errors"]
    assert (
        "accumulate_grad_batches=2" in errors["accumulate"] and "num_microbatches=8" in errors["accumulate"]
    )
    assert "batch size 6" in errors["batch"] and "num_microbatches=4" in errors["batch"]


# ---- pp = 4, tp2 x pp2, dp2 x pp2, HF under tp2 x pp2 (4 processes) ----------------------------------
FOUR_PROCESS_RUNS = [
    ({"pipeline_parallel_size": 4, "tensor_parallel_size": 1, "pipeline_schedule": "1f1b"}, 1),
    ({"pipeline_parallel_size": 4, "tensor_parallel_size": 1, "pipeline_schedule": "gpipe"}, 1),
    ({"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_schedule": "1f1b"}, 1),
    ({"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_schedule": "zbv"}, 1),
    (
        {
            "pipeline_parallel_size": 2,
            "tensor_parallel_size": 2,
            "pipeline_schedule": "interleaved_zero_bubble",
        },
        1,
    ),
    (
        {
            "pipeline_parallel_size": 2,
            "tensor_parallel_size": 2,
            "pipeline_schedule": "1f1b",
            "sequence_parallel": True,
        },
        1,
    ),
    (
        {
            "pipeline_parallel_size": 2,
            "data_parallel_size": 2,
            "tensor_parallel_size": 1,
            "pipeline_schedule": "interleaved_1f1b",
        },
        2,
    ),
]


def _four_checks(rank: int, world: int, hf_dir: str) -> dict:
    out: dict = {"parity": []}
    for kw, _ in FOUR_PROCESS_RUNS:
        strategy = lightning_par.HybridParallelStrategy(num_microbatches=MICRO, **kw)
        out["parity"].append(trainer_run(strategy, world, STEPS, BATCH, 0.05, _data(), FOUR_LAYERS))

    # Hugging Face GPT-2 under tp2 x pp2: loss through validate, logits through predict.
    model = GPT.from_hf(hf_dir)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2
    )
    trainer = quiet_trainer(strategy, world, use_distributed_sampler=False)
    ids, labels = _hf_batch()
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    out["hf_val"] = trainer.validate(model, DataLoader(rows, batch_size=4), verbose=False)[0]["val/loss"]
    preds = trainer.predict(model, DataLoader([r["input_ids"] for r in rows], batch_size=4))
    out["hf_logits"] = torch.cat(preds)  # [B, T, V / tp]: this tp rank's vocabulary slice
    out["tp_rank"] = strategy.device_mesh["tp"].get_local_rank()
    return out


def _hf_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1001, (4, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[3, -4:] = -100
    return ids, labels


def test_pp4_tp2_pp2_dp2_pp2_and_hf(tmp_path):
    hf = save_tiny_gpt2(tmp_path)
    results = run_distributed(_four_checks, 4, str(tmp_path), init_process_group=False, timeout=280)

    for i, (kw, dp) in enumerate(FOUR_PROCESS_RUNS):
        got = merge_ranks([r["parity"][i] for r in results])
        ref = reference_run(STEPS, BATCH * dp, 0.05, _data(), FOUR_LAYERS)
        assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=str(kw))

    ids, labels = _hf_batch()
    with torch.no_grad():
        ref = hf(ids, labels=labels)
    for r in results:  # every rank reports the same loss (broadcast from the last stage)
        # HF and we sum in different orders (fused vs split q/k/v, vocab-parallel softmax): fp32 round-off.
        assert r["hf_val"] == pytest.approx(float(ref.loss), rel=1e-5)
    by_tp = {r["tp_rank"]: r["hf_logits"] for r in results}
    logits = torch.cat([by_tp[0], by_tp[1]], dim=-1)[..., :1001]
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)


# ---- dp2 x tp2 x pp2 (8 processes on 2 cores: one short run) ------------------------------------------
def _eight(rank: int, world: int) -> dict:
    kw = {"data_parallel_size": 2, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    strategy = lightning_par.HybridParallelStrategy(num_microbatches=2, **kw)
    return trainer_run(strategy, world, 2, 4, 0.05, _data())


def test_dp2_tp2_pp2():
    results = run_distributed(_eight, 8, init_process_group=False, timeout=280)
    ref = reference_run(2, 8, 0.05, _data())
    assert_same_run(merge_ranks(results), ref, RTOL, ATOL, TINY["vocab_size"], what="dp2 x tp2 x pp2")


# ---- a stage that raises mid-step ends every rank -----------------------------------------------------
def test_stage_failure_ends_every_rank_with_its_message():
    script = Path(__file__).parent / "scripts" / "pipeline_failure.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    start = time.monotonic()
    # capture_output waits for every process holding the pipes (all four ranks) to exit.
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=script.parent
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure in layer 2, microbatch 1 of step 2" in proc.stderr
    for rank in range(4):
        assert f"[rank{rank}]:" in proc.stderr, f"rank {rank} did not end with an error"
    # The bar is 60 s from the failure; this includes starting 4 processes and 1.5 steps.
    assert elapsed < 60, f"ranks took {elapsed:.0f} s to end"


def test_failure_watchdog_ends_a_busy_peer():
    """A rank in no collective at all (here: asleep for 120 s) still ends within seconds of a failure."""
    script = Path(__file__).parent / "scripts" / "pipeline_failure.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "busy"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=script.parent,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 2" in proc.stderr
    assert (
        "[rank0]: ending because rank 1 failed: RuntimeError: injected failure on rank 1 at step 2"
        in proc.stderr
    )
    assert elapsed < 60, f"ranks took {elapsed:.0f} s to end (the busy rank sleeps 120 s)"


def _sigterm_calls(rank: int, world: int) -> dict:
    from types import SimpleNamespace

    from lightning_par.strategies.lightning_patches import DeferredSigtermCheck

    class Loop:
        def _broadcast_sigterm_tensor(self) -> None:
            raise AssertionError("replaced")

    trainer = SimpleNamespace(received_sigterm=False, fit_loop=SimpleNamespace(epoch_loop=Loop()))
    check = DeferredSigtermCheck(torch.distributed.new_group(backend="gloo"))
    assert check.install(trainer)
    for step in range(6):
        try:
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()  # what the loop calls before each step
        except SIGTERMException:
            check.uninstall()
            restored = "_broadcast_sigterm_tensor" not in vars(trainer.fit_loop.epoch_loop)
            return {"stopped_at": step, "restored": restored}
        if step == 2 and rank == 0:
            trainer.received_sigterm = True  # (rank 1's flag does not count: rank 0's is broadcast)
        if step == 1 and rank == 1:
            time.sleep(0.5)  # no barrier: rank 0 runs ahead into step 2 meanwhile
    return {"stopped_at": None}


def test_sigterm_check_without_a_barrier_stops_every_rank_at_the_same_step():
    """Lightning's per-step SIGTERM broadcast, replaced under pp: rank 0's flag, set during step 2, is
    read at the start of step 4 (one step later than Lightning's own check) on every rank."""
    results = run_distributed(_sigterm_calls, 2, timeout=120)
    assert results[0] == results[1] == {"stopped_at": 4, "restored": True}
