"""One fit under torchrun that may kill a rank on its first attempt; writes a hash of every rank's state.

Launched by tests/fault_tolerance/test_restart.py as
``torchrun --nproc-per-node N --max-restarts R resumable_fit.py OUT LAYOUT [KILLS]`` where ``KILLS`` is a
comma-separated list of ``start:RANK:STEP@ATTEMPT`` (SIGKILL at the start of that step),
``init:RANK:0@ATTEMPT`` (SIGKILL before ``fit``, while the others wait in ``init_process_group``) and
``save:RANK:STEP@ATTEMPT`` (SIGKILL inside the save after that step, while that rank writes its
shards), each on the given restart attempt only. Dropout is on and the data
are shuffled, so a resume that is not exact shows in the hashes. ``fit(ckpt_path="last")`` trains from
scratch when there is no checkpoint yet, as a user's script would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning_par.callbacks import ShardedCheckpoint  # noqa: E402
from lightning_par.models import GPT  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_par  # noqa: E402
from tests.parity import OPTIM, TINY, FixedBatches  # noqa: E402

STEPS = 6
LAYOUTS = {
    # layout: (strategy, model, ShardedCheckpoint(async_save=...))
    "tp2_pp2": (dict(tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2), {}, False),
    "dp2_ep2": (dict(data_parallel_size=2, expert_parallel_size=2), dict(num_experts=4, moe_top_k=2), True),
}


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def die(out: Path, rank: int, what: str) -> None:
    (out / f"killed_{attempt()}_{rank}.json").write_text(json.dumps({"time": time.time(), "what": what}))
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStepStart(L.Callback):
    def __init__(self, out: Path, rank: int, step: int, on_attempt: int) -> None:
        self.out, self.rank, self.step, self.on_attempt = out, rank, step, on_attempt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        here = trainer.global_rank == self.rank and trainer.global_step == self.step
        if here and attempt() == self.on_attempt:
            die(self.out, self.rank, f"start of step {self.step}")


def kill_inside_save(out: Path, rank: int, step: int) -> None:
    """SIGKILL on ``rank`` while it writes its shards of the save after ``step`` (before any rename)."""
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def write_or_die(self, plan, planner):
        if int(os.environ["RANK"]) == rank and f"epoch=0-step={step}.ckpt" in str(self.path):
            die(out, rank, f"inside the save after step {step}")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = write_or_die


class Timing(L.Callback):
    """When the first step of this attempt starts (restart time = that minus the kill)."""

    def __init__(self, out: Path) -> None:
        self.out, self.done = out, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done:
            self.done = True
            ckpts = (
                sorted(p.name for p in (self.out / "ckpt").iterdir()) if (self.out / "ckpt").exists() else []
            )
            info = {"time": time.time(), "step": trainer.global_step, "attempt": attempt(), "ckpts": ckpts}
            (self.out / f"first_step_{attempt()}_{trainer.global_rank}.json").write_text(json.dumps(info))


def state_hash(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    names = {id(p): n for n, p in module.named_parameters()}
    for name, p in sorted(module.named_parameters()):
        t = p.to_local() if isinstance(p, DTensor) else p
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    for p, state in optimizer.state.items():
        for key in sorted(state):
            v = state[key]
            v = v.to_local() if isinstance(v, DTensor) else v
            h.update(f"{names[id(p)]}.{key}".encode())
            h.update(torch.as_tensor(v).detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path, layout: str, kill: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    strategy_kw, model_kw, async_save = LAYOUTS[layout]
    callbacks: list[L.Callback] = [
        ShardedCheckpoint(
            dirpath=str(out / "ckpt"),
            every_n_train_steps=2,
            save_last=True,
            save_top_k=-1,
            async_save=async_save,
        ),
        Timing(out),
    ]
    for spec in kill.split(",") if kill else []:
        where, rank, rest = spec.split(":")
        step, on_attempt = (int(x) for x in rest.split("@"))
        if where == "init" and attempt() == on_attempt and int(os.environ["RANK"]) == int(rank):
            die(out, int(rank), "before fit")  # (the others wait for it in init_process_group)
        if where == "start":
            callbacks.append(KillAtStepStart(out, int(rank), step, on_attempt))
        elif attempt() == on_attempt:
            kill_inside_save(out, int(rank), step)
    L.seed_everything(1234, verbose=False)
    model = GPT(**{**TINY, "dropout": 0.1, **model_kw}, **OPTIM)
    strategy = lightning_par.HybridParallelStrategy(**strategy_kw)
    world = int(os.environ["WORLD_SIZE"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(out),
    )
    data = DataLoader(FixedBatches(96, 16, TINY["vocab_size"]), batch_size=4, shuffle=True)
    last = out / "ckpt" / "last.ckpt"
    trainer.fit(model, data, ckpt_path="last" if last.exists() else None)
    result = {
        "hash": state_hash(model, trainer.optimizers[0]),
        "step": trainer.global_step,
        "attempt": attempt(),
    }
    (out / f"hash_{trainer.global_rank}.json").write_text(json.dumps(result))
    print(f"rank {trainer.global_rank} done at step {trainer.global_step} on attempt {attempt()}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
