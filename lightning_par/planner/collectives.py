"""Timing collectives in local processes, as ``--calibrate`` does: each op back to back at two sizes
(latency and bandwidth), and small ones in pairs between stretches of compute (the wait a tp or pp
collective pays), every figure the median of passes that alternate the ops, in seconds.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from lightning_par.planner.devices import COLLECTIVES

SMALL, LARGE = 4 * 1024, 8 * 2**20  # bytes per collective buffer


def timed(fn: Any, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _op(name: str, nbytes: int, rank: int, size: int, group: Any = None) -> Any:
    """A call running collective ``name`` once on a ``nbytes`` buffer over ``group`` (``size`` ranks)."""
    import torch.distributed as dist

    n = nbytes // 4
    x = torch.ones(n)
    part = torch.empty(max(n // size, 1))
    whole = x[: part.numel() * size]
    out = torch.empty(n)
    if name == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if name == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, whole, group=group)
    if name == "all_gather":
        return lambda: dist.all_gather_into_tensor(whole, part, group=group)
    if name == "all_to_all":
        return lambda: dist.all_to_all_single(out[: whole.numel()], whole, group=group)
    peer = rank ^ 1

    def p2p() -> None:
        if peer >= dist.get_world_size():
            return
        if rank % 2 == 0:
            dist.send(x, peer)
        else:
            dist.recv(x, peer)

    return p2p


_CALLS = 16
"""Collectives per timed block: the block's mean is what a step pays (with more processes than cores a
call's wait for a descheduled rank is long-tailed: few calls per block made latencies vary 8x)."""


def _collectives(rank: int, world: int, repeat: int, size: int = 0) -> dict[str, tuple[float, float]]:
    """Every collective over groups of ``size`` ranks (0: the world), all groups at once."""
    import torch.distributed as dist

    size = size or world
    group = None
    if size < world:  # (every rank creates every group, in the same order)
        groups = [dist.new_group(list(range(g, g + size))) for g in range(0, world, size)]
        group = groups[rank // size]
    barrier = timed(dist.barrier, repeat)
    blocks = {}
    for name in COLLECTIVES:
        for nbytes in (SMALL, LARGE):
            fn = _op(name, nbytes, rank, size, group)

            def synced(fn: Any = fn) -> None:
                dist.barrier()  # (every rank starts together; 16 calls make the barrier's share small)
                for _ in range(_CALLS):
                    fn()

            synced()  # (warm-up: gloo sets up each size's algorithm on first use)
            blocks[name, nbytes] = (synced, [])
    # Every op and size once per pass, the passes one after another: a slow spell of the machine (a
    # few seconds) then spoils one sample of each rather than every sample of one op.
    for _ in range(repeat):
        for synced, samples in blocks.values():
            t0 = time.perf_counter()
            synced()
            samples.append(time.perf_counter() - t0)
    out = {}
    for name in COLLECTIVES:
        times = {
            nbytes: max((statistics.median(blocks[name, nbytes][1]) - barrier) / _CALLS, 1e-7)
            for nbytes in (SMALL, LARGE)
        }
        factor = {"all_reduce": 2 * (size - 1) / size, "p2p": 1.0}.get(name, (size - 1) / size)
        bandwidth = factor * (LARGE - SMALL) / max(times[LARGE] - times[SMALL], 1e-9)
        out[name] = (bandwidth, times[SMALL])
    return out


STRETCHES = (1e-3, 4e-3)
"""Seconds of compute between the collectives :func:`measure_interleaved` times (a tp half's forward on
the tests' models lasts about 1 ms per micro-batch of one sequence, 4 ms of four)."""


def _interleaved(rank: int, world: int, repeat: int) -> list[tuple[str, float, float]]:
    """Per call: seconds a small collective in pairs adds to a loop of compute stretches, all pairs at once.

    The stretch is a number of linear forwards sized by their CPU time (``time.thread_time``: with more
    ranks than cores the wall clock counts the others' turns too), and the loop with the collective is
    compared with the same loop without it, the two alternating pass by pass.
    """
    import torch.distributed as dist

    groups = [dist.new_group([g, g + 1]) for g in range(0, world - 1, 2)]
    group = groups[rank // 2]
    x, w = torch.randn(128, 256), torch.randn(256, 256)
    t0 = time.thread_time()
    for _ in range(50):
        x @ w
    unit = (time.thread_time() - t0) / 50
    ops = {"all_reduce": _op("all_reduce", SMALL, rank, 2, group), "p2p": _op("p2p", SMALL, rank, 2)}
    calls = 12
    samples: dict[tuple[str, float], list[float]] = {}
    for _ in range(repeat):
        for stretch in STRETCHES:
            k = max(1, round(stretch / unit))
            for name in (None, *ops):
                fn = ops.get(name) if name else None
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    for _ in range(k):
                        x @ w
                    if fn is not None:
                        fn()
                samples.setdefault((name or "", stretch), []).append(time.perf_counter() - start)
    mine = {
        (op, s): (statistics.median(samples[op, s]) - statistics.median(samples["", s])) / calls
        for op in ops
        for s in STRETCHES
    }
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return [(op, s, max(statistics.median(r[op, s] for r in every), 1e-7)) for op, s in mine]


def measure_interleaved(world: int, repeat: int = 5) -> tuple[tuple[str, float, float], ...]:
    """:attr:`DeviceSpec.interleaved` (or, with more processes than cores, its ``oversubscribed_``
    twin) on ``world`` local gloo processes in pairs (``world`` even)."""
    return tuple(in_processes(world, _interleaved, repeat))


def _child(rank: int, world: int, port: int, fn: Any, args: tuple, init: bool, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            queue.put(result)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def in_processes(world: int, fn: Any, *args: Any, init: bool = True) -> Any:
    """``fn(rank, world, *args)`` in ``world`` local gloo processes; rank 0's result."""
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
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, init, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return result


def measure_collectives(world: int = 2, repeat: int = 5, size: int = 0) -> dict[str, tuple[float, float]]:
    """``op -> (bus bandwidth bytes/s, latency s)`` of gloo on ``world`` local processes, over groups of
    ``size`` of them at once (0: the whole world)."""
    return in_processes(world, _collectives, repeat, size)
