"""Mixed precision: fp16 on CPU with a loss scale every rank agrees on, bf16 under tp2 x pp2."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning_par.callbacks import MixedPrecision, ShardedMixedPrecision
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, full, quiet_trainer

MODEL = {**TINY, "n_layer": 4}


def _poison(value: float):
    """A gradient hook that puts ``value`` into the first element of the gradient (once)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = value
        return grad

    return hook


class Overflow(L.Callback):
    """Puts an inf into one gradient of one rank at step 1; records what every rank then did."""

    def __init__(self, rank: int, bad_rank: int) -> None:
        self.rank, self.bad_rank = rank, bad_rank
        self.scales: list[float] = []
        self.skipped: list[bool] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        # Inside the backward, as an overflow happens (the gradient buckets may leave before it ends).
        if trainer.global_step == 1 and self.rank == self.bad_rank:
            self.handle = next(iter(pl_module.parameters())).register_hook(_poison(float("inf")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(self, "handle", None) is not None:
            self.handle.remove()
            self.handle = None
        plugin = trainer.strategy.precision_plugin
        self.scales.append(plugin.loss_scale)
        self.skipped.append(plugin.last_step_skipped)
        self.weights.append({n: full(p) for n, p in pl_module.named_parameters()})


def _run(rank: int, world: int, kw: dict, precision: str, bad_rank: int | None, steps: int) -> dict:
    L.seed_everything(SEED, verbose=False)
    callbacks: list = [MixedPrecision(precision, init_scale=1024.0, growth_interval=2)]
    probe = Overflow(rank, -1 if bad_rank is None else bad_rank)
    callbacks.append(probe)
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**kw), world, max_steps=steps, callbacks=callbacks
    )
    model = GPT(**MODEL, **OPTIM)
    trainer.fit(model, DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=8))
    return {
        "scales": probe.scales,
        "skipped": probe.skipped,
        "weights": probe.weights,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("precision/")},
    }


def _overflow_checks(rank: int, world: int) -> dict:
    tp = {"tensor_parallel_size": 2}
    pp = {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "num_microbatches": 2}
    dp = {"tensor_parallel_size": 1, "data_parallel_size": 2}
    return {
        "tp": _run(rank, world, tp, "16-mixed", bad_rank=1, steps=4),
        "pp": _run(rank, world, pp, "16-mixed", bad_rank=1, steps=4),  # rank 1: the last stage
        "pp_first": _run(rank, world, pp, "16-mixed", bad_rank=0, steps=2),  # the first stage
        # the distributed optimizer: the inf reaches one replica's shard only, and is still agreed
        "do": _run(rank, world, {**dp, "distributed_optimizer": True}, "16-mixed", bad_rank=1, steps=4),
    }


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank():
    results = run_distributed(_overflow_checks, 2, init_process_group=False)
    for case in ("tp", "pp", "do"):
        per_rank = [r[case] for r in results]
        for r in per_rank:
            # Step 0 clean; step 1 overflowed on rank 1 only: skipped everywhere, scale halved everywhere;
            # steps 2 and 3 clean: after growth_interval=2 clean steps the scale doubles again.
            assert r["skipped"] == [False, True, False, False], (case, r["skipped"])
            assert r["scales"] == [1024.0, 512.0, 512.0, 1024.0], (case, r["scales"])
            for name, before in r["weights"][0].items():
                assert torch.equal(r["weights"][1][name], before), f"{case}: {name} moved in the skipped step"
                assert not torch.equal(r["weights"][2][name], before) or "wpe" in name or "bias" in name
            assert torch.isfinite(torch.tensor(r["loss"]))
            # What the loggers get after the last step: the current scale and the steps skipped so far.
            assert r["logged"] == {"precision/loss_scale": 1024.0, "precision/skipped_steps": 1.0}, r[
                "logged"
            ]
        assert per_rank[0]["scales"] == per_rank[1]["scales"]
    for r in results:
        assert r["pp_first"]["skipped"] == [False, True] and r["pp_first"]["scales"] == [1024.0, 512.0]


def _bf16(rank: int, world: int) -> dict:
    kw = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "num_microbatches": 2}
    return {
        "bf16": _run(rank, world, kw, "bf16-mixed", None, 3)["loss"],
        "fp16": _run(rank, world, kw, "16-mixed", None, 3)["loss"],
    }


def _fp32_loss_after_3_steps() -> float:
    L.seed_everything(SEED, verbose=False)
    trainer = quiet_trainer("auto", 1, max_steps=3)
    trainer.fit(GPT(**MODEL, **OPTIM), DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=8))
    return float(trainer.callback_metrics["train/loss"])


def test_bf16_and_fp16_run_under_tp2_pp2():
    results = run_distributed(_bf16, 4, init_process_group=False)
    ref = _fp32_loss_after_3_steps()
    for r in results:
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); fp16 10 bits. The losses of a
        # 3-step run stay within 1% of fp32 (the weights and optimizer state are fp32 in both).
        assert r["bf16"] == pytest.approx(ref, rel=1e-2)
        assert r["fp16"] == pytest.approx(ref, rel=1e-2)
        assert r["bf16"] == results[0]["bf16"] and r["fp16"] == results[0]["fp16"]


def test_bad_precision_settings():
    with pytest.raises(ValueError, match=r"precision='8-mixed' is not supported here; valid choices"):
        MixedPrecision("8-mixed")
    with pytest.raises(ValueError, match="backoff_factor"):
        ShardedMixedPrecision("16-mixed", backoff_factor=2.0)
