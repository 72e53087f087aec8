"""Ends every rank when one fails: a failure flag in the process group's key-value store.

gloo turns a dead peer into "connection closed" within seconds, but that only reaches ranks that talk to
the dead one, and NCCL peers wait in their collective until the process-group timeout (30 minutes by
default). A rank can also be busy in something that is not communication at all. So the strategy arms
this watchdog for the training loop: a rank whose step raises writes its message under the run's key
(the first failure wins), and every other rank's daemon thread, polling the key every second, prints
that message under its own rank and ends its process.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch.distributed as dist

_PREFIX = "lightning_par/failure/"


class FailureWatchdog:
    """Arm with :meth:`start` (every rank, same ``run_id``); :meth:`report` from the failing rank."""

    def __init__(self, store: Any, rank: int, run_id: str, interval: float = 1.0) -> None:
        self.store = store
        self.rank = rank
        self.key = _PREFIX + run_id
        self.interval = interval
        self._stop = threading.Event()
        self._reported = False
        self._thread: threading.Thread | None = None

    @classmethod
    def for_process_group(cls, rank: int, interval: float = 1.0) -> FailureWatchdog | None:
        """A watchdog on the default process group's store, with a run id agreed by all ranks."""
        store = dist.distributed_c10d._get_default_store()
        if store is None:
            return None
        run_id = [os.urandom(8).hex() if rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        return cls(store, rank, run_id[0], interval)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name="lightning_par-failure-watchdog", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def report(self, exception: BaseException) -> None:
        """Tell the other ranks this one failed (the first report of a run is kept)."""
        self._reported = True
        message = f"{self.rank}|{type(exception).__name__}: {exception}"[:2000]
        try:
            self.store.compare_set(self.key, "", message)
        except Exception:  # noqa: BLE001 - the store may be gone with the failure; nothing more to do
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.store.check([self.key]):
                    continue
                value = self.store.get(self.key).decode(errors="replace")
            except Exception:  # noqa: BLE001 - a store that died with its host: the peers' errors take over
                return
            rank, _, message = value.partition("|")
            if self._reported or self._stop.is_set() or rank == str(self.rank):
                continue
            print(
                f"[rank{self.rank}]: ending because rank {rank} failed: {message}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
