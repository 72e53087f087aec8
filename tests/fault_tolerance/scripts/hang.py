"""A rank that sleeps inside a step (started by tests/fault_tolerance/test_hangs.py as a plain script, so
that Lightning's own launcher starts the two ranks): hang detection must end the run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
from lightning_par.models import GPT  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_par  # noqa: E402
from tests.parity import TINY, FixedBatches, quiet_trainer  # noqa: E402


class SleepInStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 2 and trainer.global_rank == 1:
            print(f"rank 1 falls asleep in step 2 at {time.time():.3f}", file=sys.stderr, flush=True)
            time.sleep(120)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2, hang_timeout=float(sys.argv[1]))
    trainer = quiet_trainer(strategy, 2, max_steps=5, callbacks=[SleepInStep()])
    trainer.fit(GPT(**TINY), DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4))
