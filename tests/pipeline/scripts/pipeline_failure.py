"""Runs in which one rank fails (started by tests/pipeline/test_pipeline.py as plain scripts, so that Lightning's
own launcher starts the other ranks, as in a real run).

* ``python pipeline_failure.py``: pp=4; the third stage raises inside layer 2's forward, on microbatch 1
  of the second step, while the other stages wait on it in the schedule's sends and receives.
* ``python pipeline_failure.py busy``: pp=2; rank 1 raises at the start of the second step while rank 0 is
  busy (sleeping 120 s in a callback) and talks to nobody: only the failure watchdog can end it early.
"""

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


class FailingGPT(GPT):
    def configure_model(self) -> None:
        super().configure_model()
        layer = self.model.layers["2"]
        original = layer.forward
        calls = [0]

        def forward(x, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 4 + 2:  # 4 microbatches per step: the second microbatch of step 2
                raise RuntimeError("injected failure in layer 2, microbatch 1 of step 2")
            return original(x, *args, **kwargs)

        layer.forward = forward


class Busy(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1 and trainer.global_rank == 0:
            time.sleep(120)


class RaisingGPT(GPT):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 1 and self.trainer.global_rank == 1:
            raise RuntimeError("injected failure on rank 1 at step 2")
        return super().training_step(batch, batch_idx)


def busy() -> None:
    L.seed_everything(0, verbose=False)
    strategy = lightning_par.PipelineParallelStrategy(num_microbatches=2)
    trainer = quiet_trainer(strategy, 2, max_steps=5, callbacks=[Busy()])
    trainer.fit(RaisingGPT(**TINY), DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4))


if __name__ == "__main__" and sys.argv[1:] == ["busy"]:
    busy()
elif __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    model = FailingGPT(**{**TINY, "n_layer": 4})
    strategy = lightning_par.PipelineParallelStrategy(num_microbatches=4)
    trainer = quiet_trainer(strategy, 4, max_steps=5)
    trainer.fit(model, DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4))
