"""A pp=4 run whose third stage raises in the middle of a step (run by tests/test_pipeline.py).

Started as a plain script so that Lightning's own launcher starts the other ranks, as in a real run.
The failure happens inside layer 2's forward, on microbatch 1 of the second step, while the other stages
are waiting on it in the schedule's sends and receives.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    model = FailingGPT(**{**TINY, "n_layer": 4})
    strategy = lightning_par.PipelineParallelStrategy(num_microbatches=4)
    trainer = quiet_trainer(strategy, 4, max_steps=5)
    trainer.fit(model, DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4))
