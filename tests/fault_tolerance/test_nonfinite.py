"""NaN/Inf on one rank: found by one flag reduced over the world. ``stop`` names the rank and what was
non-finite on every rank at the same step; ``skip`` drops the step on every rank (tp2 x pp2, one spawn)."""

from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch
from lightning_par.models import GPT
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import lightning_par
from lightning_par.fault_tolerance.nonfinite import NonFiniteCheck, NonFiniteError
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, quiet_trainer


class InjectNaN(L.Callback):
    """After the backward of ``step``, a NaN in the first gradient of ``rank``'s first parameter."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        self.hashes: list[str] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        h = hashlib.sha256()
        for _, p in sorted(pl_module.named_parameters()):
            t = p.to_local() if isinstance(p, DTensor) else p
            h.update(t.detach().numpy().tobytes())
        self.hashes.append(h.hexdigest())


def _fit(policy: str, rank: int, world: int) -> tuple[InjectNaN, L.Trainer]:
    L.seed_everything(SEED, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2, nonfinite=policy
    )
    inject = InjectNaN(rank, 1)
    trainer = quiet_trainer(strategy, world, max_steps=3, callbacks=[inject])
    data = DataLoader(FixedBatches(48, 16, TINY["vocab_size"]), batch_size=4)
    trainer.fit(GPT(**TINY, **OPTIM), data)
    return inject, trainer


def _runs(rank: int, world: int) -> dict:
    out: dict = {}
    # stop: a NaN on rank 3 (second tp rank of the last stage) stops every rank at step 1.
    try:
        _fit("stop", 3, world)
        out["stop"] = None
    except NonFiniteError as err:
        out["stop"] = str(err)
    # skip: a NaN on rank 1 (second tp rank of the first stage): step 1 changes nothing, on every rank.
    inject, trainer = _fit("skip", 1, world)
    out["hashes"] = inject.hashes
    out["skipped"] = trainer.strategy._nonfinite.skipped_steps
    out["step"] = trainer.global_step
    return out


def test_nan_on_one_rank_stops_every_rank_naming_it_and_skip_drops_the_step_everywhere():
    results = run_distributed(_runs, 4, init_process_group=False, timeout=240)
    for r, res in enumerate(results):
        assert res["stop"] is not None, f"rank {r} did not stop"
        assert "non-finite values at step 1: rank 3: gradient (first parameter: model." in res["stop"], res[
            "stop"
        ]
        assert res["skipped"] == 1 and res["step"] == 3, (r, res["skipped"], res["step"])
        h = res["hashes"]
        assert h[1] == h[0] and h[2] != h[1], f"rank {r}: the skipped step changed parameters ({h})"


def test_nonfinite_policy_is_validated_by_name():
    with pytest.raises(
        ValueError, match=r"nonfinite='ignore' is not valid; choose one of \['stop', 'skip', 'off'\]"
    ):
        NonFiniteCheck("ignore")
    assert not NonFiniteCheck("stop")(torch.tensor(1.0), None, [], 0)
