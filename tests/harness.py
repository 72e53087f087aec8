"""Run a function in N CPU processes (gloo) and bring back results or the children's tracebacks.

Process start costs seconds on 2 cores, so each spawn should run many checks. Every child runs under a
deadline: a hang dumps every rank's Python stack to stderr and fails the test instead of blocking CI.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    rank: int, world_size: int, port: int, fn: Callable, args: bytes, init: bool, timeout: float, q: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        import torch

        torch.set_num_threads(1)
        if init:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *pickle.loads(args))
        # Plain pickle copies tensors by value: torch's queue would pass shared-memory handles that die
        # with this process before the parent reads them.
        q.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        faulthandler.cancel_dump_traceback_later()
        # A forked child leaves with os._exit: run the exit handlers a spawned one would (W&B's flush).
        atexit._run_exitfuncs()


def _context() -> Any:
    """A forkserver whose server has imported torch, Lightning and this package once for the session.

    Each child is then a fork of it: about 5 CPU seconds of imports saved per process, which on 2 cores is
    most of a small test's time. The server runs no torch op before forking (no thread pool to inherit).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "torch.distributed", "lightning", "lightning_par", "lightning_par.models", "tests.parity"]
    )
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_process_group: bool = True,
    timeout: float = 240.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results.

    ``fn`` must be importable (module level). With ``init_process_group=False`` the child only gets the
    environment variables (for Lightning's Trainer, which starts the group itself).
    """
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            # (arguments by value: a forkserver passes at most 255 file descriptors, one per shared tensor)
            args=(r, world_size, port, fn, pickle.dumps(args), init_process_group, timeout, q),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout + 30
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=1.0)
        except queue_mod.Empty:
            if errors and all(not p.is_alive() or p.exitcode is not None for p in procs):
                break
            if any(p.exitcode not in (None, 0) for p in procs) and not errors:
                # A child died without reporting (killed, segfault, faulthandler timeout).
                time.sleep(2.0)
                if q.empty():
                    break
            if errors:
                # One rank failed: give the others a moment to report, then stop them.
                time.sleep(2.0)
                break
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        first = min(errors)
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"rank {first} failed:\n{msg}")
    if len(results) < world_size:
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        raise RuntimeError(f"processes ended without a result (exit codes {codes}); see stderr for stacks")
    sys.stdout.flush()
    return [results[r] for r in range(world_size)]
