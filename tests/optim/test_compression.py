"""Compressed gradient reduction (bf16, fp16, PowerSGD): the bytes sent equal the analytical count, the
gradients stay close to exact ones, and impossible combinations are refused by name."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, Recorder, quiet_trainer

STEPS, BATCH, RANK, START = 4, 4, 2, 2
KINDS = (None, "bf16", "fp16", "powersgd")


class Comm(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(dict(trainer.strategy.last_communication))


def _fit(world: int, kind: str | None, distributed_optimizer: bool = False, embeddings: bool = False) -> dict:
    L.seed_everything(SEED, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=1,
        gradient_compression=kind,
        powersgd_rank=RANK,
        powersgd_start_step=START,
        powersgd_compress_embeddings=embeddings,
        distributed_optimizer=distributed_optimizer,
    )
    rec, comm = Recorder(), Comm()
    trainer = quiet_trainer(strategy, world, max_steps=STEPS, callbacks=[rec, comm])
    model = GPT(**TINY, **OPTIM)
    data = FixedBatches(64, TINY["block_size"], TINY["vocab_size"])
    trainer.fit(model, DataLoader(data, batch_size=BATCH))
    embedding = {id(model.model.embed.wte.weight)}  # (the token table, a vector to PowerSGD by default)
    shapes = [tuple(p.shape) for p in model.parameters()]
    as_sent = [
        (p.numel(),) if id(p) in embedding and not embeddings else tuple(p.shape) for p in model.parameters()
    ]
    padded = sum(b.padded for buckets in trainer.strategy._all_buckets for b in buckets.buckets)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "grads": rec.grads,
        "comm": comm.steps,
        "losses": rec.losses,
        "shapes": shapes,
        "as_sent": as_sent,
        "padded": padded,
        "params": params,
    }


def _runs(rank: int, world: int) -> dict:
    out = {kind: _fit(world, kind) for kind in KINDS}
    out["bf16 reduce-scatter"] = _fit(world, "bf16", distributed_optimizer=True)
    out["powersgd embeddings"] = _fit(world, "powersgd", embeddings=True)
    return out


def _powersgd_elements(shapes: list[tuple[int, ...]], rank: int) -> int:
    """What torch's PowerSGD sends per step: (n + m) r for a matrix it compresses, the rest whole (its rule,
    with the strategy's ``min_compression_rate=1``: compress when that sends fewer elements)."""
    total = 0
    for shape in shapes:
        n = shape[0]
        m = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r < n * m else n * m
    return total


def test_compressed_reductions_send_the_counted_bytes_and_stay_close():
    results = run_distributed(_runs, 2, init_process_group=False, timeout=240)
    res = results[0]
    numel = sum(int(torch.tensor(s).prod()) for s in res[None]["shapes"])
    for kind in (*KINDS, "powersgd embeddings"):
        comm = res[kind]["comm"]
        assert len(comm) == STEPS
        for step, c in enumerate(comm):
            assert c["comm/grad_bytes_uncompressed"] == 4 * numel, (kind, step)  # fp32 gradients
            # PowerSGD: a plain all-reduce before powersgd_start_step, then the factors
            factors = numel if step < START else _powersgd_elements(res[kind].get("as_sent", []), RANK)
            expected = {None: 4 * numel, "bf16": 2 * numel, "fp16": 2 * numel}.get(kind, 4 * factors)
            assert c["comm/grad_bytes"] == expected, (kind, step, c)
            assert c["comm/grad_exposed_s"] >= 0
        assert all(torch.isfinite(torch.tensor(res[kind]["losses"])))
    # Embedding tables go whole by default (the counts above), as factors when asked.
    assert res["powersgd"]["as_sent"] != res["powersgd embeddings"]["as_sent"]
    whole, factored = (res[k]["comm"][-1]["comm/grad_bytes"] for k in ("powersgd", "powersgd embeddings"))
    assert factored < whole < 4 * numel and factored < numel  # (factored: less than a quarter of fp32)
    # Step 0 (same weights everywhere): 16-bit sums round each element to 8 (bf16) or 11 (fp16) bits;
    # PowerSGD's first step is the exact all-reduce.
    exact = res[None]["grads"][0]
    for kind, rtol in (("bf16", 2**-7), ("fp16", 2**-10), ("powersgd", 1e-6)):
        for name, g in exact.items():
            scale = g.abs().max()
            err = (res[kind]["grads"][0][name] - g).abs().max()
            assert err <= rtol * scale + 1e-9, (kind, name, float(err), float(scale))
    # The distributed optimizer's reduce-scatter in bf16: its buckets are padded to a multiple of dp.
    do = res["bf16 reduce-scatter"]
    assert do["padded"] - numel < 2 * len(res[None]["shapes"])
    for c in do["comm"]:
        assert (
            c["comm/grad_bytes"] == 2 * do["padded"] and c["comm/grad_bytes_uncompressed"] == 4 * do["padded"]
        )
    assert all(torch.isfinite(torch.tensor(do["losses"])))
    for name, value in do["params"].items():  # (the replicas gathered the same weights)
        assert torch.equal(value, results[1]["bf16 reduce-scatter"]["params"][name]), name
    # Both replicas applied the same (compressed) update: their gradients agree bitwise.
    for kind in (*KINDS, "powersgd embeddings"):
        for step in range(STEPS):
            for name, g in results[0][kind]["grads"][step].items():
                assert torch.equal(g, results[1][kind]["grads"][step][name]), (kind, step, name)


def test_bad_compression_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"gradient_compression='zip' is not valid"):
        lightning_par.HybridParallelStrategy(gradient_compression="zip")
    with pytest.raises(ValueError, match=r"gradient_compression='powersgd' needs whole gradients"):
        lightning_par.HybridParallelStrategy(gradient_compression="powersgd", distributed_optimizer=True)
    with pytest.raises(ValueError, match=r"powersgd_rank=0 is not valid"):
        lightning_par.HybridParallelStrategy(gradient_compression="powersgd", powersgd_rank=0)
    with pytest.raises(ValueError, match=r"powersgd_start_step=1 is not valid"):
        lightning_par.HybridParallelStrategy(gradient_compression="powersgd", powersgd_start_step=1)
    with pytest.raises(ValueError, match=r"powersgd_compress_embeddings='yes' is not valid"):
        lightning_par.HybridParallelStrategy(
            gradient_compression="powersgd", powersgd_compress_embeddings="yes"
        )
    with pytest.raises(ValueError, match=r"gradient_bucket_mb=0 is not valid"):
        lightning_par.HybridParallelStrategy(gradient_bucket_mb=0)
