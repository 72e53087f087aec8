"""``--calibrate``: measure this machine (matmul, attention and memory throughput, and the collectives of
the actual backend) and save it as a device profile the planner reads like a preset.

Every figure is in seconds as the code will see it: one thread per process as the tests and benchmarks
run, the process-group backend the strategy would choose (gloo on CPU, NCCL on CUDA), collectives timed
at a small and a large size to separate latency from bandwidth.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_par.planner.devices import COLLECTIVES, DeviceSpec, Link

SMALL, LARGE = 4 * 1024, 8 * 2**20  # bytes per collective buffer


def _timed(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_compute(repeat: int = 5) -> dict[str, float]:
    """FLOP/s of an fp32 matmul and of attention, and bytes/s of a large copy, on one thread."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 512), torch.randn(512, 1024)
    matmul = 2 * 1024 * 512 * 1024 / _timed(lambda: a @ b, repeat)
    q = torch.randn(4, 8, 256, 64)
    attention = (
        4
        * 4
        * 256
        * 256
        * 512
        / _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), repeat)
    )
    x = torch.empty(16 * 2**20 // 4)
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 4 / _timed(lambda: y.copy_(x), repeat)
    # Host time per op: a tiny linear, GELU and sum, forward and backward (about 10 ops).
    w = torch.randn(4, 4, requires_grad=True)
    v = torch.randn(2, 4)

    def tiny() -> None:
        torch.nn.functional.gelu(v @ w).sum().backward()

    op = _timed(tiny, 20 * repeat) / 10
    return {"matmul_flops": matmul, "attention_flops": attention, "memory_bandwidth": copy, "op_overhead": op}


def _op(name: str, nbytes: int, rank: int, world: int) -> Any:
    """A call running collective ``name`` once on a ``nbytes`` buffer."""
    import torch.distributed as dist

    n = nbytes // 4
    x = torch.ones(n)
    part = torch.empty(max(n // world, 1))
    whole = x[: part.numel() * world]
    out = torch.empty(n)
    if name == "all_reduce":
        return lambda: dist.all_reduce(x)
    if name == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, whole)
    if name == "all_gather":
        return lambda: dist.all_gather_into_tensor(whole, part)
    if name == "all_to_all":
        return lambda: dist.all_to_all_single(out[: whole.numel()], whole)
    peer = rank ^ 1

    def p2p() -> None:
        if peer >= world:
            return
        if rank % 2 == 0:
            dist.send(x, peer)
        else:
            dist.recv(x, peer)

    return p2p


def _collectives(rank: int, world: int, repeat: int) -> dict[str, tuple[float, float]]:
    import torch.distributed as dist

    barrier = _timed(dist.barrier, repeat)
    out = {}
    for name in COLLECTIVES:
        times = {}
        for nbytes in (SMALL, LARGE):
            fn = _op(name, nbytes, rank, world)

            def synced(fn: Any = fn) -> None:
                dist.barrier()  # (every rank starts together; four calls make the barrier's share small)
                for _ in range(4):
                    fn()

            times[nbytes] = max((_timed(synced, repeat) - barrier) / 4, 1e-7)
        factor = {"all_reduce": 2 * (world - 1) / world, "p2p": 1.0}.get(name, (world - 1) / world)
        bandwidth = factor * (LARGE - SMALL) / max(times[LARGE] - times[SMALL], 1e-9)
        out[name] = (bandwidth, times[SMALL])
    return out


def _child(rank: int, world: int, port: int, repeat: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _collectives(rank, world, repeat)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def measure_collectives(world: int = 2, repeat: int = 5) -> dict[str, tuple[float, float]]:
    """``op -> (bus bandwidth bytes/s, latency s)`` of gloo on ``world`` local processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A forkserver that has imported torch once: each child is a fork of it (a spawned child would import
    # torch again, about 10 s on 2 busy cores), and no child inherits this process's threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, world, port, repeat, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def calibrate(
    path: str | Path | None = None, world: int = 2, repeat: int = 5, name: str = "calibrated-cpu"
) -> DeviceSpec:
    """Measure this machine and return (and, given ``path``, save) its device profile."""
    compute = measure_compute(repeat)
    per_op = measure_collectives(world, repeat)
    bw, lat = per_op["all_reduce"]
    link = Link(bandwidth=bw, latency=lat, measured=tuple((op, b, la) for op, (b, la) in per_op.items()))
    spec = DeviceSpec(
        name=name,
        peak_flops=compute["matmul_flops"],
        memory_bytes=float(_memory_bytes()),
        memory_bandwidth=compute["memory_bandwidth"],
        intra_node=link,
        inter_node=link,
        matmul_efficiency=1.0,
        attention_efficiency=compute["attention_flops"] / compute["matmul_flops"],
        memory_efficiency=1.0,
        op_overhead=compute["op_overhead"],
        usable_memory_fraction=0.8,
        compute_slots=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        source="calibrated",
    )
    if path is not None:
        spec.save(path)
    return spec


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30
