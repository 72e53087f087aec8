"""Global batch size: accumulation (tp=2, dp=2) and pipeline microbatches (pp=2) equal one large batch,
also when micro-batches hold different numbers of counted tokens; a Megatron-style ramp-up of the global
batch equals a one-process run on batches of the ramp's sizes, and survives a resume."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_par.callbacks import GlobalBatchSize
from lightning_par.callbacks.accumulation import BatchSizeRampup
from lightning_par.models import GPT
from torch.utils.data import DataLoader, DistributedSampler

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
# Ramp 2 -> 8 in increments of 2 over 12 samples: 4 samples per increment, so the steps take 2, 2, 4, 6,
# then 8 samples (consumed 0, 2, 4, 8, 14 > 12, ...): k = 1, 1, 2, 3, 4, 4 micro-batches of 2 on tp2.
RAMP = BatchSizeRampup(start=2, increment=2, samples=12)
RAMP_SIZES = [2, 2, 4, 6, 8, 8]
RAMP_SAVE_AT = 3


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
    ("dp2_do", {"tensor_parallel_size": 1, "data_parallel_size": 2, "distributed_optimizer": True}, 2),
]
DP2_DO = {"tensor_parallel_size": 1, "data_parallel_size": 2, "distributed_optimizer": True}


def _no_grads(ref: dict, name: str) -> dict:
    """The distributed optimizer keeps the reduced gradients in its shards, not in ``.grad``: compare the
    rest (losses, norms, weights)."""
    if not name.endswith("_do"):
        return ref
    return {**ref, "grads": [{} for _ in ref["grads"]], "clipped": [{} for _ in ref["clipped"]]}


def _constant_runs(world: int) -> dict:
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


class StepRecorder(L.Callback):
    """Per optimizer step: the token-weighted loss over the global batch, clipped gradients, norm, ramp state."""

    def __init__(self, batch_size: GlobalBatchSize) -> None:
        self.batch_size = batch_size
        self.losses: list[float] = []
        self.clipped: list[dict[str, torch.Tensor]] = []
        self.norms: list[float] = []
        self.global_batch: list[int] = []
        self.accumulate: list[int] = []
        self.consumed: list[int] = []
        self._sums = torch.zeros(2, dtype=torch.float64)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the micro-batch's token mean divided by the step's k: undo both.
        k = trainer.accumulate_grad_batches
        tokens = outputs["num_tokens"].double()
        stats = torch.stack([outputs["loss"].detach().double() * k * tokens, tokens])
        self._sums += trainer.strategy.reduce(stats, reduce_op="sum")
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self.losses.append(float(self._sums[0] / self._sums[1]))
        self._sums.zero_()
        self.clipped.append({n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})
        self.norms.append(float(trainer.strategy.last_grad_norm))
        self.global_batch.append(self.batch_size.current_global_batch_size)
        self.accumulate.append(k)
        self.consumed.append(self.batch_size.consumed_samples)


class BatchStarts(L.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.count += 1


def _ramped_fit(
    world: int,
    kw: dict,
    micro: int,
    max_steps: int,
    ckpt_dir: str | None = None,
    resume: str | None = None,
    rampup: Any = RAMP,
    loader_batch: int | None = None,
) -> dict:
    callback = GlobalBatchSize(GLOBAL, micro, rampup=rampup)
    rec, steps = Recorder(), StepRecorder(callback)
    callbacks: list = [callback, rec, steps]
    if ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=RAMP_SAVE_AT, save_top_k=-1
            )
        )
    L.seed_everything(SEED, verbose=False)
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**kw),
        world,
        max_steps=max_steps,
        gradient_clip_val=0.05,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
    )
    model = GPT(**TINY, **OPTIM)
    trainer.fit(model, DataLoader(_uneven(), batch_size=loader_batch or micro), ckpt_path=resume)
    return {
        "grads": rec.grads,
        "clipped": steps.clipped,
        "norms": steps.norms,
        "losses": steps.losses,
        "params": {n: full(p) for n, p in model.named_parameters()},
        "global_batch": steps.global_batch,
        "accumulate": steps.accumulate,
        "consumed": steps.consumed,
        "tokens": callback.consumed_tokens,
    }


def _refused(world: int, kw: dict, micro: int, rampup: Any) -> tuple[str, int]:
    """The error a ramp that does not fit the layout raises, and how many batches ran before it."""
    starts = BatchStarts()
    callback = GlobalBatchSize(GLOBAL, micro, rampup=rampup)
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**kw), world, max_steps=1, callbacks=[callback, starts]
    )
    try:
        trainer.fit(GPT(**TINY, **OPTIM), DataLoader(_uneven(), batch_size=micro))
    except ValueError as err:
        return str(err), starts.count
    return "no error", starts.count


def _runs(rank: int, world: int, tmp: str) -> dict:
    out = _constant_runs(world)
    tp2, dp2 = {"tensor_parallel_size": 2}, {"tensor_parallel_size": 1, "data_parallel_size": 2}
    out["ramp_tp2"] = _ramped_fit(world, tp2, 2, len(RAMP_SIZES), ckpt_dir=f"{tmp}/ramp")
    out["ramp_dp2"] = _ramped_fit(world, dp2, 1, len(RAMP_SIZES), rampup=[2, 2, 12])  # the YAML list form
    out["ramp_dp2_do"] = _ramped_fit(world, DP2_DO, 1, len(RAMP_SIZES))
    out["ramp_resume"] = _ramped_fit(
        world, tp2, 2, len(RAMP_SIZES), resume=f"{tmp}/ramp/step={RAMP_SAVE_AT}.ckpt"
    )
    pp2 = {"tensor_parallel_size": 1, "pipeline_parallel_size": 2}
    # Under pp each run has gcd(2, 2) / (micro 1 x dp 1) = 2 microbatches; steps accumulate 1 to 4 runs.
    out["ramp_pp2"] = _ramped_fit(world, pp2, 1, len(RAMP_SIZES), loader_batch=2)
    out["refused_pp"] = _refused(world, pp2, 2, RAMP)  # runs of 2 / 2 = 1 microbatch: too few for 1F1B
    out["refused_start"] = _refused(world, dp2, 2, RAMP)  # start 2 is not a multiple of 2 x dp 2
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """One spawn of 2 processes for every run of this module (process start is the slow part)."""
    return run_distributed(
        _runs, 2, str(tmp_path_factory.mktemp("acc")), init_process_group=False, timeout=400
    )


def test_accumulation_and_microbatches_equal_one_large_batch(results):
    ref = reference_run(STEPS, GLOBAL, 0.05, _uneven())
    assert ref["norms"][0] > 0.05  # clipping is active, so the norm of the accumulated gradient is tested
    for name, _, _ in RUNS:
        got = merge_ranks([r[name] for r in results])
        assert results[0][name]["consumed"][0] == STEPS * GLOBAL
        # Gradients (before and after clipping), norms and weights; the recorded losses are the
        # micro-batches' own, so they are not compared with the reference's whole-batch losses.
        assert_same_run(
            got, _no_grads(ref, name), RTOL, ATOL, TINY["vocab_size"], what=name, compare_losses=False
        )
    assert results[0]["tp2"]["accumulate"] == 2 and results[0]["dp2"]["accumulate"] == 2
    assert results[0]["pp2"]["accumulate"] == 1 and results[0]["pp2"]["microbatches"] == 2


def _megatron_global_batch(consumed: int, start: int, increment: int, samples: int, global_: int) -> int:
    """Megatron-Core's RampupBatchsizeNumMicroBatchesCalculator.update, written out independently."""
    num_increments = (global_ - start) // increment
    rampup_samples_per_increment = samples / num_increments
    if consumed > samples:
        return global_
    return start + int(consumed / rampup_samples_per_increment) * increment


def test_rampup_schedule_follows_megatron():
    for start, increment, samples, global_ in [
        (2, 2, 12, 8),
        (32, 32, 1000, 1024),
        (16, 48, 977, 160),
        (4, 4, 3, 16),
    ]:
        cb = GlobalBatchSize(global_, 1, rampup=[start, increment, samples])
        for consumed in range(0, samples + 3 * global_):
            assert cb.global_batch_size_at(consumed) == _megatron_global_batch(
                consumed, start, increment, samples, global_
            ), (start, increment, samples, global_, consumed)
    # The steps a run takes: each step's size is the ramp's at the samples consumed before it.
    cb, consumed, sizes = GlobalBatchSize(GLOBAL, 2, rampup=RAMP), 0, []
    for _ in RAMP_SIZES:
        sizes.append(cb.global_batch_size_at(consumed))
        consumed += sizes[-1]
    assert sizes == RAMP_SIZES


def _ramped_reference(sizes: list[int], clip: float) -> dict:
    """One process, plain PyTorch: step i takes the next ``sizes[i]`` rows of the sampler's permutation."""
    L.seed_everything(SEED, verbose=False)
    data = _uneven()
    model = GPT(**TINY, **OPTIM)
    model.configure_model()
    opt = torch.optim.AdamW(model._param_groups(), lr=OPTIM["learning_rate"], betas=(0.9, 0.95))
    from lightning_par.models.base import warmup_cosine

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(OPTIM["warmup_steps"], OPTIM["lr_decay_steps"], 0.1)
    )
    # The permutation Lightning's DistributedSampler draws; dp replicas interleave it, so the union of a
    # step's micro-batches over replicas is the next contiguous run of it (see parity.reference_run).
    order = list(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=SEED))
    out: dict[str, Any] = {"losses": [], "grads": [], "clipped": [], "norms": []}
    first = 0
    for size in sizes:
        rows = order[first : first + size]
        first += size
        batch = {k: torch.stack([data[i][k] for i in rows]) for k in ("input_ids", "labels")}
        opt.zero_grad()
        loss_sum, n = model._loss(batch)
        loss = loss_sum / n
        loss.backward()
        out["losses"].append(float(loss))
        out["tokens"] = out.get("tokens", 0) + int(n)
        out["grads"].append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        out["clipped"].append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
        sched.step()
    out["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out


def test_rampup_run_equals_reference_with_batches_of_the_ramp_sizes(results):
    ref = _ramped_reference(RAMP_SIZES, 0.05)
    consumed = [sum(RAMP_SIZES[: i + 1]) for i in range(len(RAMP_SIZES))]
    runs = (("ramp_tp2", 2 * 1), ("ramp_dp2", 1 * 2), ("ramp_pp2", 1 * 1 * 2), ("ramp_dp2_do", 1 * 2))
    for name, micro_x_dp in runs:
        got = merge_ranks([r[name] for r in results])
        run = results[0][name]
        assert run["global_batch"] == RAMP_SIZES, name
        assert run["accumulate"] == [size // micro_x_dp for size in RAMP_SIZES], name
        assert run["consumed"] == consumed, name
        # Loss per step (token-weighted over the global batch), gradients before and after clipping, norms
        # and final weights: the parity bar (RTOL, ATOL above: fp32 sums in another order).
        assert_same_run(got, _no_grads(ref, name), RTOL, ATOL, TINY["vocab_size"], what=name)
    for name, _ in runs:
        assert results[0][name]["tokens"] == ref["tokens"], name

    # Resumed after step 3 (consumed 8): the ramp goes on from there, and on the same layout the losses
    # are bitwise those of the uninterrupted run (same seed, same layout: bitwise-identical losses).
    resumed, straight = results[0]["ramp_resume"], results[0]["ramp_tp2"]
    assert resumed["global_batch"] == RAMP_SIZES[RAMP_SAVE_AT:]
    assert resumed["consumed"] == consumed[RAMP_SAVE_AT:]
    assert resumed["losses"] == straight["losses"][RAMP_SAVE_AT:]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name


def test_bad_global_batch_size_and_rampup(results):
    with pytest.raises(ValueError, match=r"global_batch_size=0 is not valid"):
        GlobalBatchSize(0, 4)
    bad = [
        ([2, 2], r"rampup=\[2, 2\] is not valid: give \[start, increment, samples\]"),
        ([0, 2, 12], r"rampup.start=0 is not valid: it must be an integer >= 1"),
        ([8, 2, 12], r"rampup.start=8 is not valid with global_batch_size=8: .* \(1 to 7\)"),
        ([2, 4, 12], r"rampup.increment=4 does not divide .* = 6; valid increments: \[1, 2, 3, 6\]"),
        ([2, 2, 0], r"rampup.samples=0 is not valid"),
        (BatchSizeRampup(2, 2.5, 12), r"rampup.increment=2.5 is not valid"),
    ]
    for rampup, message in bad:
        with pytest.raises(ValueError, match=message):
            GlobalBatchSize(GLOBAL, 2, rampup=rampup)
    # Errors that depend on the layout come from setup, on every rank, before any batch ran.
    message, batches = results[0]["refused_pp"]
    assert batches == 0, message
    assert (
        "gives pipeline runs of gcd(start, increment) / (micro_batch_size x dp) = 1 microbatches" in message
    )
    assert (
        "1F1B needs num_microbatches" in message
        and "Choose start and increment whose gcd is a larger multiple of 2" in message
    )
    message, batches = results[0]["refused_start"]
    assert batches == 0
    assert (
        "rampup.start=2 is not a multiple of micro_batch_size (2) x data_parallel_size (2) = 4" in message
    ), message
    assert "valid values include [4]" in message
