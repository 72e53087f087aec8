"""What the Trainer-based benchmarks share: random token batches and a per-step wall-clock timer."""

from __future__ import annotations

import time

import lightning as L
import torch


class RandomTokens(torch.utils.data.Dataset):
    """``length`` sequences of ``seq_len`` random ids (row ``i`` the same in every process)."""

    def __init__(self, vocab_size: int, seq_len: int, length: int) -> None:
        self.vocab_size, self.seq_len, self.length = vocab_size, seq_len, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids}


class StepTimer(L.Callback):
    """Seconds of every training step, and the strategy's exposed gradient wait where it reports one."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.exposed: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter() - self._t0)
        comm = getattr(trainer.strategy, "last_communication", None) or {}
        self.exposed.append(comm.get("comm/grad_exposed_s", 0.0))
