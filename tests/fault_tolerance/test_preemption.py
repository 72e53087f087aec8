"""Preemption: SIGTERM reaching the ranks in different steps makes every rank save ``last.ckpt`` after
the same step and end fit normally; a relaunch with ``ckpt_path="last"`` continues bitwise (pp=2, with
dropout and shuffled data, the layout whose SIGTERM flag has no per-step barrier)."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus
from lightning_par.callbacks import ShardedCheckpoint
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, quiet_trainer

STEPS = 6


class SignalSelf(L.Callback):
    """SIGTERM to this process at the start of ``steps[rank]`` (the ranks get it in different steps)."""

    def __init__(self, steps: dict[int, int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps.get(trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(world: int, ckpt_dir: Path, callbacks: list, ckpt_path: str | None = None) -> tuple[L.Trainer, str]:
    L.seed_everything(SEED, verbose=False)
    model = GPT(**{**TINY, "dropout": 0.1}, **OPTIM)
    strategy = lightning_par.PipelineParallelStrategy(pipeline_parallel_size=2, num_microbatches=2)
    ckpt = ShardedCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=100)
    trainer = quiet_trainer(
        strategy, world, max_steps=STEPS, callbacks=[ckpt, *callbacks], enable_checkpointing=True
    )
    data = DataLoader(FixedBatches(96, 16, TINY["vocab_size"]), batch_size=4, shuffle=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().numpy().tobytes())
    for state in trainer.optimizers[0].state.values():
        for key in sorted(state):
            h.update(state[key].detach().numpy().tobytes())
    return trainer, h.hexdigest()


def _runs(rank: int, world: int, tmp: str) -> dict:
    _, uninterrupted = _fit(world, Path(tmp) / "ref", [])
    trainer, _ = _fit(world, Path(tmp) / "run", [SignalSelf({0: 2, 1: 3})])
    ckpt = next(c for c in trainer.callbacks if isinstance(c, ShardedCheckpoint))
    stopped = {
        "step": trainer.global_step,
        "preempted_at": ckpt.preempted_at,
        "finished": trainer.state.status == TrainerStatus.FINISHED,
        "last": (Path(tmp) / "run" / "last.ckpt").is_dir(),
    }
    resumed, resumed_hash = _fit(world, Path(tmp) / "run", [], ckpt_path="last")
    return {"stopped": stopped, "same": resumed_hash == uninterrupted, "final_step": resumed.global_step}


def test_sigterm_saves_every_rank_at_one_step_and_the_relaunch_continues_bitwise(tmp_path):
    results = run_distributed(_runs, 2, str(tmp_path), init_process_group=False, timeout=240)
    stops = [r["stopped"] for r in results]
    # Rank 0 is signalled during the third step (global_step 2 at its start), rank 1 during the fourth:
    # both stop after the fourth (the step after the first signal, where the agreed flag is read), at
    # global_step 4, save it and finish normally.
    assert stops[0] == stops[1] == {"step": 4, "preempted_at": 4, "finished": True, "last": True}, stops
    for r, res in enumerate(results):
        assert res["final_step"] == STEPS
        assert res["same"], f"rank {r}: the relaunch did not continue bitwise"
