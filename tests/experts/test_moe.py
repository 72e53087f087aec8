"""Mixture-of-experts GPT under expert parallel (alone and with tp, pp, dp): parity with one process.

The reference is the same MoE GPT trained by a plain PyTorch loop in one process, every expert local
(no all-to-all, no strategy). Parallel runs must give the same loss (token loss plus the aux losses),
gradients, clipped gradients, norms and weights, and log the same routing statistics: the same tokens
per expert and the same dropped fraction (so the same tokens were dropped) at every step.
"""

from __future__ import annotations

import pytest
import torch
from lightning_par.models import GPT

import lightning_par
from lightning_par.distributed.layout import ParallelLayout
from tests.harness import run_distributed
from tests.parity import TINY, FixedBatches, assert_same_run, merge_ranks, reference_run, trainer_run

# The parity bar of every layout test: fp32 round-off from sums taken in another order (token sums
# split over replicas and microbatches, expert outputs combined after a round trip through all-to-all).
RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH = 3, 4
DROPLESS = {"n_layer": 4, "num_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2}
# Capacity ceil(0.5 * 16 tokens * 2 / 4 experts) = 4 assignments per expert and sequence: half dropped.
CAPPED = {**DROPLESS, "moe_capacity_factor": 0.5}


def _data() -> FixedBatches:
    return FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)


def _assert_same_routing(got: dict, ref: dict, model_kw: dict, what: str) -> None:
    """Logged tokens per expert and dropped fraction equal the reference's, step by step and layer by layer."""
    E = model_kw["num_experts"]
    assert len(got["moe"]) == len(ref["moe"]) == STEPS
    for step, (logged, raw) in enumerate(zip(got["moe"], ref["moe"], strict=True)):
        for layer, stats in raw.items():
            load, kept, assigned = stats[:E], stats[E], stats[E + 1]
            for e in range(E):
                assert logged[f"moe/layer{layer}/tokens_expert{e}"] == float(load[e]), (what, step, layer, e)
            assert logged[f"moe/layer{layer}/dropped_fraction"] == pytest.approx(float(1 - kept / assigned))
            if "moe_capacity_factor" not in model_kw:
                assert float(load.sum()) == float(assigned)  # dropless: tokens x k assignments, all kept
            else:
                assert 0 < float(1 - kept / assigned) < 1  # the capped runs do drop tokens


def _check(results: list[dict], batch: int, model_kw: dict, what: str) -> None:
    got = merge_ranks(results)
    ref = reference_run(STEPS, batch, 0.05, _data(), model_kw)
    assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=what)
    _assert_same_routing(got, ref, model_kw, what)


# ---- 2 processes: ep2 dropless and capped, pp2 with MoE layers on both stages ---------------------------
TWO_PROCESS_RUNS = [
    ("ep2 dropless", lambda: lightning_par.ExpertParallelStrategy(), DROPLESS, 2),
    ("ep2 capacity 0.5", lambda: "ep", CAPPED, 2),
    (
        "pp2 capped (MoE layers 1 and 3, one per stage)",
        lambda: lightning_par.PipelineParallelStrategy(num_microbatches=2),
        CAPPED,
        1,
    ),
    (
        "tp2 sequence parallel, capped",
        lambda: lightning_par.TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
        CAPPED,
        1,
    ),
    (
        "pp2 zbv dropless",
        lambda: lightning_par.PipelineParallelStrategy(pipeline_schedule="zbv", num_microbatches=2),
        DROPLESS,
        1,
    ),
]


def _two(rank: int, world: int) -> list[dict]:
    return [
        trainer_run(make(), world, STEPS, BATCH, 0.05, _data(), kw) for _, make, kw, _ in TWO_PROCESS_RUNS
    ]


def test_ep2_and_pp2_moe_match_one_process():
    results = run_distributed(_two, 2, init_process_group=False, timeout=280)
    for i, (what, _, kw, dp) in enumerate(TWO_PROCESS_RUNS):
        _check([r[i] for r in results], BATCH * dp, kw, what)


# ---- 4 processes: ep4, tp2 x ep2, pp2 x ep2 (the tp_pp_ep preset on 4 devices) ----------------------------
FOUR_PROCESS_RUNS = [
    ("ep4 dropless", lambda: "ep", DROPLESS, 4),
    (
        "dp2 x tp2 with ep2, capped",
        lambda: lightning_par.HybridParallelStrategy(
            tensor_parallel_size=2, data_parallel_size=2, expert_parallel_size=2
        ),
        CAPPED,
        2,
    ),
    ("tp_pp_ep preset: pp2 x dp2 with ep2", lambda: "tp_pp_ep", DROPLESS, 2),
]


def _four(rank: int, world: int) -> list[dict]:
    return [
        trainer_run(make(), world, STEPS, BATCH, 0.05, _data(), kw) for _, make, kw, _ in FOUR_PROCESS_RUNS
    ]


def test_ep4_tp2_ep2_pp2_ep2_match_one_process():
    results = run_distributed(_four, 4, init_process_group=False, timeout=280)
    for i, (what, _, kw, dp) in enumerate(FOUR_PROCESS_RUNS):
        _check([r[i] for r in results], BATCH * dp, kw, what)


# ---- no processes ---------------------------------------------------------------------------------------
def test_expert_parallel_layout_rule_and_bad_input():
    layout = ParallelLayout.from_world_size(8, 2, None, 1, expert_parallel_size=2)
    assert (layout.dp, layout.tp, layout.ep) == (4, 2, 2)
    assert ParallelLayout.from_world_size(4, 1, None, 1, expert_parallel_size=None).ep == 4
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 does not divide data_parallel_size=4"):
        ParallelLayout.from_world_size(4, 1, None, 1, expert_parallel_size=3)
    with pytest.raises(ValueError, match=r"moe_top_k=5 is not valid: it must be between 1 and num_experts=4"):
        GPT(**{**TINY, **DROPLESS, "moe_top_k": 5})
    with pytest.raises(ValueError, match=r"moe_capacity_factor=0.0 is not valid: it must be > 0"):
        GPT(**{**TINY, **DROPLESS, "moe_capacity_factor": 0.0})
    with pytest.raises(ValueError, match=r"moe_layer_freq=5 is not valid"):
        GPT(**{**TINY, **DROPLESS, "moe_layer_freq": 5})
    # Parameter names carry global expert indices: the same keys whatever ep shards them.
    model = GPT(**{**TINY, **DROPLESS})
    model.configure_model()
    names = {n for n, _ in model.named_parameters()}
    assert {f"model.layers.{i}.mlp.experts.{e}.fc.weight" for i in (1, 3) for e in range(4)} <= names
    assert "model.layers.0.mlp.fc.weight" in names and "model.layers.1.mlp.fc.weight" not in names


# ---- checkpoints saved with ep=2 resume on ep=2 (bitwise) and ep=1; mixed precision under ep ----------
GLOBAL, SAVE_AT, TOTAL = 8, 4, 8


def _fit_moe(
    world: int, max_steps: int, ckpt: str | None, resume: str | None, callbacks: list
) -> list[float]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from tests.parity import OPTIM, SEED, quiet_trainer

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    L.seed_everything(SEED, verbose=False)
    losses = Losses()
    extra = (
        [ModelCheckpoint(dirpath=ckpt, save_last=True, every_n_train_steps=SAVE_AT, save_top_k=0)]
        if ckpt
        else []
    )
    trainer = quiet_trainer(
        lightning_par.ExpertParallelStrategy(),
        world,
        max_steps=max_steps,
        gradient_clip_val=0.05,
        callbacks=[losses, *extra, *callbacks],
        enable_checkpointing=ckpt is not None,
    )
    data = FixedBatches(GLOBAL * SAVE_AT, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    trainer.fit(
        GPT(**{**TINY, **CAPPED}, **OPTIM), DataLoader(data, batch_size=GLOBAL // world), ckpt_path=resume
    )
    return losses.values


def _ep2_checkpoint_and_precision(rank: int, world: int, tmp: str) -> dict:
    from lightning_par.callbacks import MixedPrecision

    from tests.callbacks.test_precision import Overflow

    out = {
        "straight": _fit_moe(world, TOTAL, None, None, []),
        "save": _fit_moe(world, SAVE_AT, f"{tmp}/ep2", None, []),
        "resume": _fit_moe(world, TOTAL, None, f"{tmp}/ep2/last.ckpt", []),
    }

    class ExpertOverflow(Overflow):
        """The inf goes into an expert's gradient (rank 1 holds experts 2 and 3)."""

        def on_after_backward(self, trainer, pl_module) -> None:
            if trainer.global_step == 1 and self.rank == self.bad_rank:
                grad = dict(pl_module.named_parameters())["model.layers.3.mlp.experts.3.fc.weight"].grad
                grad.view(-1)[0] = float("inf")

    for precision in ("bf16-mixed", "16-mixed"):
        probe = ExpertOverflow(rank, bad_rank=1 if precision == "16-mixed" else -1)
        amp = MixedPrecision(precision, init_scale=1024.0, growth_interval=2)
        out[precision] = (_fit_moe(world, 4, None, None, [amp, probe]), probe.skipped, probe.scales)
    return out


def _ep1_resume(rank: int, world: int, tmp: str) -> list[float]:
    return _fit_moe(world, TOTAL, None, f"{tmp}/ep2/last.ckpt", [])


def test_ep2_checkpoint_resumes_on_ep2_and_ep1_and_mixed_precision(tmp_path):
    results = run_distributed(
        _ep2_checkpoint_and_precision, 2, str(tmp_path), init_process_group=False, timeout=280
    )
    ep1 = run_distributed(_ep1_resume, 1, str(tmp_path), init_process_group=False)[0]
    r = results[0]
    straight = r["straight"]
    assert r["save"] == straight[:SAVE_AT]
    assert r["resume"] == straight[SAVE_AT:]  # same layout: bitwise
    # ep=1 holds every expert in one process; the checkpoint's keys are the same (global expert
    # indices), and the continuation matches to fp32 round-off (the parity tests' bar).
    torch.testing.assert_close(torch.tensor(ep1), torch.tensor(straight[SAVE_AT:]), rtol=RTOL, atol=ATOL)
    # Mixed precision under ep2: bf16 rounds to 8 bits of mantissa (0.4%), fp16 to 10; a 4-step run stays
    # within 1% of fp32 (fp32 weights and optimizer state in both).
    for precision in ("bf16-mixed", "16-mixed"):
        losses, skipped, scales = r[precision]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[0] == pytest.approx(straight[0], rel=1e-2)
    # fp16: an inf in one expert's gradient on rank 1 at step 1 makes both ranks skip that step and halve
    # the scale.
    for rank_result in results:
        _, skipped, scales = rank_result["16-mixed"]
        assert skipped == [False, True, False, False] and scales == [1024.0, 512.0, 512.0, 1024.0]
    # GPT-2 in transformers has no experts: export is refused before anything is written.
    from lightning_par.cli import main

    with pytest.raises(ValueError, match=r"mixture-of-experts GPT \(num_experts=4\).*cannot be exported"):
        main(["export-hf", str(tmp_path / "ep2" / "last.ckpt"), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_num_experts_not_divisible_by_ep_is_refused_before_any_weight_exists():
    with torch.device("meta"):
        model = GPT(**{**TINY, **DROPLESS})
        model.configure_model()
    moe = model.model.moe_modules()[1]
    with pytest.raises(
        ValueError, match=r"expert_parallel_size=3 does not divide num_experts=4; valid .*\[1, 2, 4\]"
    ):
        moe.shard_experts(None, 0, 3)
    assert len(moe.experts) == 4  # nothing was removed


# ---- tp2 x pp2 x ep2 (the tp_pp_ep preset on 8 processes; one short run on 2 cores) -----------------------
def _eight(rank: int, world: int) -> dict:
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=None,
        pipeline_parallel_size=None,
        data_parallel_size=2,
        expert_parallel_size=None,
        num_microbatches=2,
    )
    out = trainer_run(strategy, world, 2, BATCH, 0.05, _data(), CAPPED)
    layout = strategy.layout
    out["layout"] = (layout.tp, layout.pp, layout.dp, layout.ep)
    return out


def test_tp2_pp2_ep2_matches_one_process():
    results = run_distributed(_eight, 8, init_process_group=False, timeout=280)
    assert results[0]["layout"] == (2, 2, 2, 2)
    got = merge_ranks(results)
    ref = reference_run(2, 2 * BATCH, 0.05, _data(), CAPPED)
    assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what="tp2 x pp2 x ep2")
