"""Global batch size: accumulation (tp=2, dp=2) and pipeline microbatches (pp=2) equal one large batch,
also when micro-batches hold different numbers of counted tokens."""

from __future__ import annotations

import lightning as L
import pytest
from lightning_par.callbacks import GlobalBatchSize
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import (
    OPTIM,
    SEED,
    TINY,
    FixedBatches,
    Recorder,
    assert_same_run,
    full,
    merge_ranks,
    quiet_trainer,
    reference_run,
)

# The parity tests' bar: sums of fp32 in another order (per micro-batch, per replica) and the division by
# the global token count applied to summed gradients instead of to each loss.
RTOL, ATOL = 1e-5, 1e-6
STEPS, GLOBAL = 3, 8


def _uneven() -> FixedBatches:
    data = FixedBatches(64, TINY["block_size"], TINY["vocab_size"], seed=5)
    for i in range(len(data)):
        data.labels[i, : (3 * i) % 11] = -100  # 0 to 10 ignored tokens per row
    return data


class StepNorms(L.Callback):
    """The clipping norm of each optimizer step (not of each micro-batch)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self.norms.append(float(trainer.strategy.last_grad_norm))


RUNS = [
    ("tp2", {"tensor_parallel_size": 2}, 4),
    ("dp2", {"tensor_parallel_size": 1, "data_parallel_size": 2}, 2),
    ("pp2", {"tensor_parallel_size": 1, "pipeline_parallel_size": 2}, 4),
]


def _runs(rank: int, world: int) -> dict:
    out = {}
    for name, kw, micro in RUNS:
        callback = GlobalBatchSize(GLOBAL, micro)
        rec, norms = Recorder(), StepNorms()
        L.seed_everything(SEED, verbose=False)
        trainer = quiet_trainer(
            lightning_par.HybridParallelStrategy(**kw),
            world,
            max_steps=STEPS,
            gradient_clip_val=0.05,
            callbacks=[callback, rec, norms],
        )
        model = GPT(**TINY, **OPTIM)
        # Under pipeline parallel a loader batch holds all the step's microbatches.
        steps = GLOBAL // (micro * kw.get("data_parallel_size", 1))
        loader_batch = micro * steps if "pipeline_parallel_size" in kw else micro
        trainer.fit(model, DataLoader(_uneven(), batch_size=loader_batch))
        k = trainer.accumulate_grad_batches  # Recorder's batch-end records: keep the last of each step
        out[name] = {
            "grads": rec.grads,
            "clipped": rec.clipped[k - 1 :: k],
            "norms": norms.norms,
            "losses": [],
            "params": {n: full(p) for n, p in model.named_parameters()},
            "accumulate": trainer.accumulate_grad_batches,
            "microbatches": getattr(trainer.strategy, "num_microbatches", None),
            "consumed": (callback.consumed_samples, callback.consumed_tokens),
        }
    return out


def test_accumulation_and_microbatches_equal_one_large_batch():
    results = run_distributed(_runs, 2, init_process_group=False, timeout=240)
    ref = reference_run(STEPS, GLOBAL, 0.05, _uneven())
    assert ref["norms"][0] > 0.05  # clipping is active, so the norm of the accumulated gradient is tested
    for name, _, _ in RUNS:
        got = merge_ranks([r[name] for r in results])
        assert results[0][name]["consumed"][0] == STEPS * GLOBAL
        # Gradients (before and after clipping), norms and weights; the recorded losses are the
        # micro-batches' own, so they are not compared with the reference's whole-batch losses.
        assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=name, compare_losses=False)
    assert results[0]["tp2"]["accumulate"] == 2 and results[0]["dp2"]["accumulate"] == 2
    assert results[0]["pp2"]["accumulate"] == 1 and results[0]["pp2"]["microbatches"] == 2


def test_bad_global_batch_size():
    with pytest.raises(ValueError, match=r"global_batch_size=0 is not valid"):
        GlobalBatchSize(0, 4)
