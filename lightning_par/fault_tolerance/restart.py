"""Process groups that survive torchrun's restarts.

``torchrun --max-restarts N`` restarts every worker when one dies, but on torch 2.13 and 2.14 the
restarted workers find the previous attempt's gloo addresses in the agent's key-value store and hang or
fail with "Connection refused" (pytorch#135712): the rendezvous keys of the default process group do not
depend on the attempt. :func:`elastic_store` gives each attempt its own namespace of that store, so the new
process group (and every group made from it: sub-meshes, ``new_group``) starts clean. The strategy
creates its default process group on it whenever it runs under torchelastic.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def restart_count() -> int | None:
    """How many times torchelastic restarted this job (``None``: not launched by torchrun)."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return None if value is None else int(value)


def elastic_store(timeout: timedelta) -> dist.Store | None:
    """The agent's store, prefixed by the restart attempt (``None`` when not under torchrun)."""
    attempt = restart_count()
    if attempt is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,  # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE)
        timeout=timeout,
    )
    return dist.PrefixStore(f"lightning_par/attempt_{attempt}", base)


def init_elastic_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> bool:
    """Create the default process group on this attempt's store; ``False`` when not under torchrun."""
    if dist.is_initialized():
        return False
    store = elastic_store(timeout)
    if store is None:
        return False
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return True
