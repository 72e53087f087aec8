"""Gradient buckets launched during backward: the same gradients as reducing after backward, and they did
leave early.

Each layout with data parallel runs twice, ``overlap_grad_reduce`` on and off, with buckets small enough
(10 KB) that the tiny GPT has many; gradients (or, with the distributed optimizer, which keeps them in its
shards, norms and weights) must agree to rtol 1e-6.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning_par.callbacks import GlobalBatchSize
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, Recorder, full, quiet_trainer

STEPS, BATCH = 2, 4
MOE = {"n_layer": 4, "num_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2}
PP2 = {"pipeline_parallel_size": 2, "num_microbatches": 2}
LAYOUTS = {
    "dp2 x tp2 sp": ({"tensor_parallel_size": 2, "data_parallel_size": 2, "sequence_parallel": True}, {}),
    "dp2 x pp2 1f1b": ({"data_parallel_size": 2, **PP2}, {"n_layer": 4}),
    "dp2 x pp2 zbv": ({"data_parallel_size": 2, **PP2, "pipeline_schedule": "zbv"}, {"n_layer": 4}),
    "ep2 in dp4": ({"data_parallel_size": 4, "expert_parallel_size": 2}, MOE),
    "dp4, 2 micro-batches per step": ({"data_parallel_size": 4}, {}),
    "distributed optimizer dp2 x tp2": (
        {"tensor_parallel_size": 2, "data_parallel_size": 2, "distributed_optimizer": True},
        {},
    ),
    "distributed optimizer dp2 x tp2, parameters gathered during the next forward": (
        {
            "tensor_parallel_size": 2,
            "data_parallel_size": 2,
            "distributed_optimizer": True,
            "overlap_param_gather": True,
        },
        {},
    ),
    "distributed optimizer dp2 x pp2 (tied head), parameters gathered during the next forward": (
        {"data_parallel_size": 2, **PP2, "distributed_optimizer": True, "overlap_param_gather": True},
        {"n_layer": 4},
    ),
    "distributed optimizer dp2 x pp2 (tied head)": (
        {"data_parallel_size": 2, **PP2, "distributed_optimizer": True},
        {"n_layer": 4},
    ),
}


class Launches(L.Callback):
    """Per step: buckets launched from backward, and buckets in all."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        buckets = trainer.strategy._all_buckets  # (the closure's reduction just waited for them)
        self.steps.append(
            (sum(b.launches_from_backward for b in buckets), sum(len(b.buckets) for b in buckets))
        )


def _fit(world: int, kw: dict, model_kw: dict, overlap: bool, accumulate: bool) -> dict:
    L.seed_everything(SEED, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(
        **{"tensor_parallel_size": 1, **kw}, overlap_grad_reduce=overlap, gradient_bucket_mb=0.01
    )
    rec, launches = Recorder(), Launches()
    callbacks: list = [rec, launches]
    dp = kw.get("data_parallel_size", 1)
    if accumulate:
        callbacks.append(GlobalBatchSize(BATCH * dp, BATCH // 2))
    trainer = quiet_trainer(strategy, world, max_steps=STEPS, gradient_clip_val=0.05, callbacks=callbacks)
    data = FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    model = GPT(**{**TINY, **model_kw}, **OPTIM)
    trainer.fit(model, DataLoader(data, batch_size=BATCH // 2 if accumulate else BATCH))
    return {
        "grads": rec.grads,
        "norms": rec.norms,
        "losses": rec.losses,
        "params": {n: full(p) for n, p in model.named_parameters()},
        "launches": launches.steps,
        "accumulate": trainer.accumulate_grad_batches,
    }


def _runs(rank: int, world: int) -> dict:
    return {
        (name, overlap): _fit(world, kw, model_kw, overlap, accumulate=name.startswith("dp4"))
        for name, (kw, model_kw) in LAYOUTS.items()
        for overlap in (True, False)
    }


def test_overlapped_buckets_equal_reducing_after_backward_on_every_dp_layout():
    results = run_distributed(_runs, 4, init_process_group=False, timeout=300)
    close = dict(rtol=1e-6, atol=1e-9)
    for rank, res in enumerate(results):
        for name in LAYOUTS:
            on, off = res[(name, True)], res[(name, False)]
            what = f"rank {rank}, {name}"
            assert len(on["launches"]) == STEPS, what
            assert len(on["grads"]) == len(off["grads"]) > 0, what
            for step, (g_on, g_off) in enumerate(zip(on["grads"], off["grads"], strict=True)):
                assert g_on.keys() == g_off.keys(), what
                for n in g_off:
                    torch.testing.assert_close(
                        g_on[n],
                        g_off[n],
                        **close,
                        msg=lambda m, n=n, s=step, w=what: f"{w} step {s} {n}: {m}",
                    )
            torch.testing.assert_close(torch.tensor(on["norms"]), torch.tensor(off["norms"]), **close)
            for n, value in off["params"].items():
                torch.testing.assert_close(
                    on["params"][n], value, **close, msg=lambda m, n=n, w=what: f"{w} {n}: {m}"
                )
            # Every bucket left from backward (overlap), none without; zero-bubble: the weight pass's.
            for early, total in on["launches"]:
                assert total > 1, what  # 10 KB buckets: several
                expect = total - 1 if "tied" in name else total  # (the tied weights' bucket waits)
                assert early == expect, (what, early, total)
            assert all(early == 0 for early, _ in off["launches"]), what
    assert results[0][("dp4, 2 micro-batches per step", True)]["accumulate"] == 2
    # The all-gather overlapped with the next forward: the same losses, norms and final weights.
    for res in results:
        for layout in ("distributed optimizer dp2 x tp2", "distributed optimizer dp2 x pp2 (tied head)"):
            plain = res[(layout, True)]
            late = res[(f"{layout}, parameters gathered during the next forward", True)]
            assert late["losses"] == plain["losses"] and late["norms"] == plain["norms"], layout
            for n, value in plain["params"].items():
                assert torch.equal(late["params"][n], value), (layout, n)
