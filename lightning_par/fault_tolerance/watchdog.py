"""Ends every rank when one fails: a failure flag in the process group's key-value store.

gloo turns a dead peer into "connection closed" within seconds, but that only reaches ranks that talk to
the dead one, and NCCL peers wait in their collective until the process-group timeout (30 minutes by
default). A rank can also be busy in something that is not communication at all. So the strategy arms
this watchdog for the training loop: a rank whose step raises writes its message under the run's key
(the first failure wins), and every other rank's daemon thread, polling the key every second, prints
that message under its own rank and ends its process.

Hangs: a rank that stops making progress without raising (stuck in a collective, a deadlocked data
loader, an endless loop) is found the same way. With ``hang_timeout`` set, the strategy marks progress
after every training, validation and optimizer step; a rank whose last mark is older than the time-out writes where its main thread is (its
step, its Python stack, and whether it is waiting inside ``torch.distributed``) to the store. Every rank
does so at about the same time (the others wait for the stuck one in their collectives), so after a short
grace each rank names the *suspects*: the ranks not waiting for a peer (or that wrote nothing at all),
prints their stacks and exits with :data:`HANG_EXIT_CODE`, which torchrun treats as a failure to restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

import torch.distributed as dist

_PREFIX = "lightning_par/failure/"
HANG_EXIT_CODE = 124
"""Exit status of every rank of a run ended by hang detection (like ``timeout``'s)."""


class FailureWatchdog:
    """Arm with :meth:`start` (every rank, same ``run_id``); :meth:`report` from the failing rank."""

    def __init__(
        self,
        store: Any,
        rank: int,
        run_id: str,
        interval: float = 1.0,
        hang_timeout: float | None = None,
        world_size: int = 1,
    ) -> None:
        self.store = store
        self.rank = rank
        self.key = _PREFIX + run_id
        self.interval = interval
        self.hang_timeout = hang_timeout
        self.world_size = world_size
        self._stop = threading.Event()
        self._reported = False
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident
        self._last_progress = time.monotonic()
        self._step: int | None = None

    @classmethod
    def for_process_group(
        cls, rank: int, interval: float = 1.0, hang_timeout: float | None = None
    ) -> FailureWatchdog | None:
        """A watchdog on the default process group's store, with a run id agreed by all ranks."""
        store = dist.distributed_c10d._get_default_store()
        if store is None:
            return None
        run_id = [os.urandom(8).hex() if rank == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        return cls(store, rank, run_id[0], interval, hang_timeout, dist.get_world_size())

    def progress(self, step: int) -> None:
        """This rank is making progress (called at every step start and end)."""
        self._step = step
        self._last_progress = time.monotonic()

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
            if self.hang_timeout is not None and time.monotonic() - self._last_progress > self.hang_timeout:
                self._end_hang()
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

    # ---- hangs ---------------------------------------------------------------------------------------
    def _where(self) -> dict[str, Any]:
        frame = sys._current_frames().get(self._main)
        stack = traceback.format_stack(frame) if frame is not None else []
        innermost = "".join(stack[-3:])
        waiting = "torch/distributed" in innermost.replace("\\", "/")
        return {"step": self._step, "waiting": waiting, "stack": "".join(stack[-12:])}

    def _end_hang(self) -> None:
        """Write where this rank is, name the suspects from every rank's answer, print, exit."""
        idle = time.monotonic() - self._last_progress
        mine = self._where()
        with contextlib.suppress(Exception):  # (the store may be gone with a failure)
            self.store.set(f"{self.key}/hang/{self.rank}", json.dumps(mine))
        reports: dict[int, dict[str, Any]] = {self.rank: mine}
        deadline = time.monotonic() + max(3.0, 3 * self.interval)
        while time.monotonic() < deadline and len(reports) < self.world_size:
            for r in range(self.world_size):
                key = f"{self.key}/hang/{r}"
                with contextlib.suppress(Exception):  # (the store may be gone with a failure)
                    if r not in reports and self.store.check([key]):
                        reports[r] = json.loads(self.store.get(key).decode())
            time.sleep(0.2)
        suspects = [r for r in range(self.world_size) if r not in reports or not reports[r]["waiting"]]
        if not suspects:
            suspects = sorted(reports)  # every rank waits for another: a deadlock among collectives
        lines = [
            f"[rank{self.rank}]: hang detected: no progress on this rank for {idle:.0f} s "
            f"(hang_timeout={self.hang_timeout:g} s) in step {mine['step']}; stuck rank(s): {suspects}."
        ]
        for r in suspects:
            got = reports.get(r)
            if got is None:
                lines.append(f"  rank {r} wrote nothing (its process is gone or frozen).")
            else:
                lines.append(
                    f"  rank {r}, step {got['step']}, Python stack (innermost last):\n{got['stack']}"
                )
        print("\n".join(lines), file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)
