"""``--calibrate``: measure this machine (matmul, attention and memory throughput, and the collectives of
the actual backend) and save it as a device profile the planner reads like a preset.

Every figure is in seconds as the code will see it: one thread per process as the tests and benchmarks
run, compute measured with as many processes at once as a run keeps busy, the process-group backend the
strategy would choose (gloo on CPU, NCCL on CUDA), collectives timed at a small and a large size to
separate latency from bandwidth.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lightning_par.planner.collectives import in_processes, measure_collectives, measure_interleaved, timed
from lightning_par.planner.devices import DeviceSpec, Link


def measure_compute(repeat: int = 5) -> dict[str, float]:
    """One thread's throughputs, each measured on the kind of work a training step does: FLOP/s of fp32
    linear layers forward and backward, of attention forward and backward, the
    elementwise kernels' bytes/s counted as the cost model counts them, AdamW's step and the host time
    per tensor op."""
    torch.set_num_threads(1)
    # Linear layers forward and backward (y = x W^T, then dX = dY W and dW = dY^T X: the transposed
    # operands backward really multiplies), of a transformer block's shapes, 512 tokens.
    flops = seconds = 0.0
    for h in (256, 512):
        for k, n in ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)):
            x = torch.randn(512, k, requires_grad=True)
            w = torch.randn(n, k, requires_grad=True)
            flops += 3 * 2 * 512 * k * n
            seconds += timed(lambda x=x, w=w: torch.nn.functional.linear(x, w).sum().backward(), repeat)
    matmul = flops / seconds
    # Attention forward and backward: 3x the forward's 4 n s h FLOPs, as the cost model counts them.
    q = torch.randn(4, 8, 256, 64, requires_grad=True)

    def attention_step() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()

    attention = 3 * 4 * (4 * 256) * 256 * 512 / timed(attention_step, repeat)
    # Elementwise: layer norm and GELU forward and backward; the cost model charges five passes over
    # the bytes they keep for backward (their two inputs), so the rate is in those units.
    x = torch.randn(1024, 1024, requires_grad=True)

    def elementwise() -> None:
        torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, (1024,))).sum().backward()

    memory = 5 * 2 * x.numel() * 4 / timed(elementwise, repeat)
    # AdamW's step (torch's default implementation), at the cost model's 32 bytes per element.
    p = torch.nn.Parameter(torch.randn(2**22))
    p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW([p], lr=1e-3)
    optimizer = 32 * p.numel() / timed(adamw.step, 3 * repeat)
    # Host time per op: a tiny linear, GELU and sum, forward and backward (about 10 ops).
    w = torch.randn(4, 4, requires_grad=True)
    v = torch.randn(2, 4)

    def tiny() -> None:
        torch.nn.functional.gelu(v @ w).sum().backward()

    op = timed(tiny, 20 * repeat) / 10
    return {
        "matmul_flops": matmul,
        "attention_flops": attention,
        "memory_bandwidth": memory,
        "optimizer_bandwidth": optimizer,
        "op_overhead": op,
    }


def _loaded_compute(rank: int, world: int, repeat: int) -> dict[str, float]:
    """:func:`measure_compute` on every rank at once; the median over ranks of each figure."""
    import torch.distributed as dist

    dist.barrier()
    mine = measure_compute(repeat)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return {key: statistics.median(r[key] for r in every) for key in mine}


def measure_loaded_compute(processes: int, repeat: int = 5) -> dict[str, float]:
    """One thread's throughputs while ``processes`` processes measure them side by side: a training run
    keeps every core busy, and cores that share caches and memory are slower so than alone (on this
    2-core machine two concurrent matmul loops each ran 0.83-1.0x one alone in most rounds)."""
    if processes <= 1:
        return measure_compute(repeat)
    return in_processes(processes, _loaded_compute, repeat)


# The framework's own time: a model so small that its compute is a few milliseconds.
_TINY = dict(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=16)
_TINY_BATCH = 8  # sequences per step; under pipeline parallel, micro-batches of one


def _framework_steps(rank: int, world: int, steps: int) -> dict[str, float]:
    """Median step seconds of the tiny GPT through ``lightning.Trainer`` and the hybrid strategy: data
    parallel over every process, and a two-stage 1F1B pipeline of one-sequence micro-batches."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_par.models import GPT
    from lightning_par.strategies.hybrid import HybridParallelStrategy

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)

    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, _TINY["vocab_size"], (64 * _TINY_BATCH, _TINY["block_size"]), generator=g)
    ]
    layouts = {
        "data": dict(data_parallel_size=world),
        "pipeline": dict(
            pipeline_parallel_size=2,
            data_parallel_size=world // 2,
            num_microbatches=_TINY_BATCH // (world // 2),
            pipeline_schedule="1f1b",
        ),
    }
    out = {}
    for name, kw in layouts.items():
        timer = Timer()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=HybridParallelStrategy(tensor_parallel_size=1, nonfinite="off", **kw),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_steps=3 + steps,
            callbacks=[timer],
        )
        batch = _TINY_BATCH // kw["data_parallel_size"]
        trainer.fit(GPT(**_TINY, warmup_steps=1), DataLoader(rows, batch_size=batch))
        out[name] = statistics.median(timer.times[3:])
    return out


def measure_framework(device: DeviceSpec, world: int = 2, steps: int = 8) -> tuple[float, float]:
    """(seconds per step, seconds per pipeline micro-batch pass) the framework adds to a step beyond the
    cost model's compute and communication: Lightning's loop, the strategy, the pipeline runner's
    schedule and transfers, measured on the tiny GPT and less the model's own prediction for it."""
    from lightning_par.planner.cost import Layout
    from lightning_par.planner.model import ModelSpec
    from lightning_par.planner.search import evaluate

    measured = in_processes(world, _framework_steps, steps, init=False)
    tiny, seq = ModelSpec.from_any(_TINY), _TINY["block_size"]
    bare = replace(device, step_overhead=0.0, action_overhead=0.0)
    data = Layout(tp=1, pp=1, dp=world, micro_batch_size=_TINY_BATCH // world)
    per_step = (
        measured["data"] - evaluate(tiny, data, bare, world, _TINY_BATCH, seq, "32-true").prediction["step_s"]
    )
    per_step = max(per_step, 0.0)
    m = _TINY_BATCH // (world // 2)
    pipe = Layout(tp=1, pp=2, dp=world // 2, micro_batch_size=1, num_microbatches=m)
    with_step = replace(bare, step_overhead=per_step)
    predicted = evaluate(tiny, pipe, with_step, world, _TINY_BATCH, seq, "32-true").prediction["step_s"]
    return per_step, max((measured["pipeline"] - predicted) / (2 * m), 0.0)


def with_compute(spec: DeviceSpec, compute: dict[str, float]) -> DeviceSpec:
    """``spec`` with the throughputs of a :func:`measure_compute` (re-measured when the machine drifts)."""
    return replace(
        spec,
        peak_flops=compute["matmul_flops"],
        memory_bandwidth=compute["memory_bandwidth"],
        matmul_efficiency=1.0,
        attention_efficiency=compute["attention_flops"] / compute["matmul_flops"],
        memory_efficiency=1.0,
        op_overhead=compute["op_overhead"],
        optimizer_bandwidth=compute["optimizer_bandwidth"],
    )


def calibrate(
    path: str | Path | None = None, world: int = 2, repeat: int = 5, name: str = "calibrated-cpu"
) -> DeviceSpec:
    """Measure this machine and return (and, given ``path``, save) its device profile."""
    slots = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    compute = measure_loaded_compute(min(world, slots), repeat)

    def link_of(ranks: int, size: int = 0) -> Link:
        per_op = measure_collectives(ranks, repeat, size)
        bw, lat = per_op["all_reduce"]
        return Link(bandwidth=bw, latency=lat, measured=tuple((op, b, la) for op, (b, la) in per_op.items()))

    link = link_of(world)
    # Layouts with more processes than cores (the tests' 4 processes on 2 cores) share them; their
    # collectives wait for ranks to be scheduled, measured as such: over the whole world, and in pairs
    # (tp or dp groups of 2 communicating side by side, as in tp2 x dp2 or tp2 x pp2), and between
    # stretches of compute (a rank then waits for its partner's turn on a core).
    over = 2 * slots if 2 * slots <= 8 else 0
    oversubscribed = link_of(over) if over else None
    oversubscribed_pairs = link_of(over, 2) if over > 2 else None
    interleaved = measure_interleaved(world, repeat) if world % 2 == 0 else ()
    oversubscribed_interleaved = measure_interleaved(over, repeat) if over > 2 else ()
    spec = DeviceSpec(
        name=name,
        peak_flops=compute["matmul_flops"],
        memory_bytes=float(_memory_bytes()),
        memory_bandwidth=compute["memory_bandwidth"],
        intra_node=link,
        inter_node=link,
        comm_overlap=False,
        usable_memory_fraction=0.8,
        compute_slots=slots,
        oversubscribed=oversubscribed,
        oversubscribed_pairs=oversubscribed_pairs,
        interleaved=interleaved,
        oversubscribed_interleaved=oversubscribed_interleaved,
        source="calibrated",
    )
    spec = with_compute(spec, compute)
    step, action = measure_framework(spec, world)
    spec = replace(spec, step_overhead=step, action_overhead=action)
    if path is not None:
        spec.save(path)
    return spec


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30
