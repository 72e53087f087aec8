"""NaN/Inf on one rank (tp2 x pp2, one spawn). ``stop`` with clipping: every rank stops at the same step
naming the rank and what was non-finite (the agreed gradient norm); ``stop`` without clipping: the rank
that sees it raises and the failure watchdog ends the others with its message; ``skip`` drops the step on
every rank."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        # Inside the backward, where a NaN would appear (the gradient buckets may leave before it ends).
        if trainer.global_rank == self.rank and trainer.global_step == self.step:

            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("nan")
                return grad

            self.handle = next(iter(pl_module.parameters())).register_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if getattr(self, "handle", None) is not None:
            self.handle.remove()
            self.handle = None
        h = hashlib.sha256()
        for _, p in sorted(pl_module.named_parameters()):
            t = p.to_local() if isinstance(p, DTensor) else p
            h.update(t.detach().numpy().tobytes())
        self.hashes.append(h.hexdigest())


TP2_PP2 = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "num_microbatches": 2}


def _fit(
    policy: str, rank: int, world: int, clip: float | None = None, layout: dict = TP2_PP2
) -> tuple[InjectNaN, L.Trainer]:
    L.seed_everything(SEED, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(**layout, nonfinite=policy)
    inject = InjectNaN(rank, 1)
    trainer = quiet_trainer(strategy, world, max_steps=3, callbacks=[inject], gradient_clip_val=clip)
    data = DataLoader(FixedBatches(48, 16, TINY["vocab_size"]), batch_size=4)
    trainer.fit(GPT(**TINY, **OPTIM), data)
    return inject, trainer


def _runs(rank: int, world: int, tmp: str) -> None:
    out: dict = {}
    # stop, clipping on: a NaN on rank 3 (second tp rank of the last stage) stops every rank at step 1.
    try:
        _fit("stop", 3, world, clip=1.0)
        out["stop"] = None
    except NonFiniteError as err:
        out["stop"] = str(err)
    # skip: a NaN on rank 1 (second tp rank of the first stage): step 1 changes nothing, on every rank.
    inject, trainer = _fit("skip", 1, world)
    out["hashes"] = inject.hashes
    out["skipped"] = trainer.strategy._nonfinite.skipped_steps
    out["step"] = trainer.global_step
    # skip with the distributed optimizer (tp2 x dp2): its shards hold the gradients it drops.
    do = {"tensor_parallel_size": 2, "data_parallel_size": 2, "distributed_optimizer": True}
    inject, trainer = _fit("skip", 1, world, layout=do)
    out["do"] = (inject.hashes, trainer.strategy._nonfinite.skipped_steps)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    # stop, no clipping (no collective of its own): rank 2 raises, the watchdog ends the others.
    try:
        _fit("stop", 2, world)
    except NonFiniteError as err:
        Path(tmp, f"local{rank}.txt").write_text(str(err))
        raise


def test_nan_on_one_rank_stops_or_skips_on_every_rank(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        run_distributed(_runs, 4, str(tmp_path), init_process_group=False, timeout=240)
    # The local check: rank 2 raised (and wrote its message); the others were ended, by the failure
    # watchdog or by a pipeline peer's closed connection, without raising it themselves.
    assert "failed" in str(failed.value)
    raised = {p.name for p in tmp_path.glob("local*.txt")}
    assert raised == {"local2.txt"}, raised
    local = (tmp_path / "local2.txt").read_text()
    assert "non-finite values at step 1: rank 2: gradient (first parameter: model." in local, local
    for r in range(4):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["stop"] is not None, f"rank {r} did not stop"
        assert "non-finite values at step 1: rank 3: gradient (first parameter: model." in res["stop"], res[
            "stop"
        ]
        assert res["skipped"] == 1 and res["step"] == 3, (r, res["skipped"], res["step"])
        h = res["hashes"]
        assert h[1] == h[0] and h[2] != h[1], f"rank {r}: the skipped step changed parameters ({h})"
        h, skipped = res["do"]
        assert skipped == 1 and h[1] == h[0] and h[2] != h[1], f"rank {r}, distributed optimizer: {h}"


def test_nonfinite_policy_is_validated_by_name():
    with pytest.raises(
        ValueError, match=r"nonfinite='ignore' is not valid; choose one of \['stop', 'skip', 'off'\]"
    ):
        NonFiniteCheck("ignore")
    assert not NonFiniteCheck("stop")(torch.tensor(1.0), None, [], 0)
