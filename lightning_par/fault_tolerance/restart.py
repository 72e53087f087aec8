"""Launches from outside (torchrun, SLURM): checked before any work, and process groups that survive
torchrun's restarts.

``torchrun --max-restarts N`` restarts every worker when one dies, but on torch 2.13 and 2.14 the
restarted workers find the previous attempt's gloo addresses in the agent's key-value store and hang or
fail with "Connection refused" (pytorch#135712): the rendezvous keys of the default process group do not
depend on the attempt. Naming the keys by ``TORCHELASTIC_RESTART_COUNT`` is not enough on several nodes:
each agent counts only the restarts its own workers caused, so after a rank on another node fails the
agents' counts differ. Instead, every attempt gets a store of its own: global rank 0 starts a new
``TCPStore`` and publishes its address in the agent's store under one fixed key; the other ranks read the
key and connect, reading it again while it still names the previous attempt's rank 0 (which the agents
stopped before the restart, so its address refuses). The default process group, and every group made
from it (sub-meshes, ``new_group``), then starts from an empty store.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

STORE_KEY = "lightning_par/attempt_store"
_CONNECT_TRY = timedelta(seconds=5)


def restart_count() -> int | None:
    """How many times torchelastic restarted this agent's workers (``None``: not launched by torchrun)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return None if value is None else int(value)


def check_external_launch(environment: Any, num_devices: int, num_nodes: int) -> None:
    """SLURM's or torchrun's task counts against ``devices`` and ``num_nodes``, before any process group.

    Lightning (2.6) calls ``validate_settings`` only when it starts the processes itself, so a SLURM job
    with ``--ntasks-per-node=4`` and ``devices=2`` would build a layout for half its ranks.
    """
    if environment is not None and environment.creates_processes_externally:
        environment.validate_settings(num_devices=num_devices, num_nodes=num_nodes)


def attempt_store(rank: int, timeout: timedelta) -> dist.Store | None:
    """A store that only this restart attempt uses (``None`` when not under torchrun)."""
    if restart_count() is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,  # torchrun's agent hosts this store (TORCHELASTIC_USE_AGENT_STORE)
        timeout=timeout,
    )
    if rank == 0:
        store = dist.TCPStore("0.0.0.0", 0, is_master=True, timeout=timeout, wait_for_workers=False)
        agent.set(STORE_KEY, f"{socket.getfqdn()}:{store.port}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, _, port = agent.get(STORE_KEY).decode().rpartition(":")  # waits for the first attempt's
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=_CONNECT_TRY)
            store.set_timeout(timeout)
            return store
        except (RuntimeError, OSError):  # the previous attempt's address: read the key again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def init_elastic_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> bool:
    """Create the default process group on this attempt's store; ``False`` when not under torchrun."""
    if dist.is_initialized():
        return False
    store = attempt_store(rank, timeout)
    if store is None:
        return False
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return True
