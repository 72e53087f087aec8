"""Everyday Lightning on GPT: ``trainer.predict`` on every layout, a run bounded only by ``max_time``, and bad
input refused with a message that names it (not a raw torch error).

Predictions are compared with an independent reference: a one-process ``GPT(**TINY)`` with the same init
seed (the weights are drawn from the seed and each parameter's global name, so every layout starts from the
same numbers), its full-vocabulary logits cut to ``vocab_size``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from lightning_par.callbacks import GlobalBatchSize
from lightning_par.models import GPT
from torch.utils.data import DataLoader, Dataset

import lightning_par
from tests.harness import run_distributed
from tests.parity import SEED, TINY, FixedBatches, quiet_trainer

# Logits of tp and pp layouts differ from one process only by fp32 sums in another order (partial matmuls
# summed over tp): the parity tests' bar.
RTOL, ATOL = 1e-5, 1e-6
ROWS, BATCH = 10, 4  # batches of 4, 4 and 2 rows: under pp the short one is padded to whole microbatches
V = TINY["vocab_size"]
MAX_SECONDS, WARMUP, LR = 3, 2, 1e-3


class IdsOnly(Dataset):
    """The rows of :class:`FixedBatches` as ``{"input_ids"}`` (no labels) or as plain tensors of ids."""

    def __init__(self, as_dict: bool) -> None:
        self.ids = FixedBatches(ROWS, TINY["block_size"], V).ids
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Any:
        return {"input_ids": self.ids[i]} if self.as_dict else self.ids[i]


class BatchIds(L.Callback):
    """The token ids of every predict batch this rank saw (to compute the reference for the same rows)."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.ids.append((batch["input_ids"] if isinstance(batch, dict) else batch).clone())


class LearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _predict(strategy: Any, devices: int, data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``trainer.predict`` of a fresh ``GPT(**TINY)``: ``(input_ids, logits)`` per batch on this rank."""
    model = GPT(**TINY, init_seed=SEED)
    ids = BatchIds()
    trainer = quiet_trainer(strategy, devices, callbacks=[ids])
    predictions = trainer.predict(model, dataloaders=DataLoader(data, batch_size=BATCH))
    assert len(predictions) == len(ids.ids), (len(predictions), len(ids.ids))
    return list(zip(ids.ids, predictions, strict=True))


def _max_time_run(devices: int) -> dict:
    """A pp run bounded by time only: trains until the timer stops it, LR constant after warmup."""
    L.seed_everything(SEED, verbose=False)
    model = GPT(**TINY, learning_rate=LR, warmup_steps=WARMUP, init_seed=SEED)
    lrs = LearningRates()
    trainer = quiet_trainer(
        lightning_par.PipelineParallelStrategy(pipeline_parallel_size=2),
        devices,
        max_time={"seconds": MAX_SECONDS},
        max_steps=-1,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[lrs],
    )
    data = DataLoader(FixedBatches(16, TINY["block_size"], V), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=data)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    return {
        "lrs": lrs.lrs,
        "global_step": trainer.global_step,
        "elapsed": timer.time_elapsed("train"),
        "warnings": [str(w.message) for w in caught],
    }


def _bad_predict_ids(devices: int) -> str:
    """Under pp every rank refuses an out-of-vocabulary id before the stages run (none waits for another)."""
    model = GPT(**TINY, init_seed=SEED)
    ids = FixedBatches(4, TINY["block_size"], V).ids
    ids[1, 3] = V + 7
    trainer = quiet_trainer(lightning_par.PipelineParallelStrategy(pipeline_parallel_size=2), devices)
    with pytest.raises(
        ValueError, match=rf"input_ids holds the token id {V + 7}, outside .* 0\.\.{V - 1}"
    ) as e:
        trainer.predict(model, dataloaders=DataLoader(ids, batch_size=4))
    return str(e.value)


def _two_process_runs(rank: int, world: int) -> dict:
    out = {
        "tp2": _predict(
            lightning_par.TensorParallelStrategy(tensor_parallel_size=2),
            world,
            FixedBatches(ROWS, TINY["block_size"], V),
        ),
        "tp2_sp": _predict(
            lightning_par.TensorParallelStrategy(tensor_parallel_size=2, sequence_parallel=True),
            world,
            IdsOnly(as_dict=True),
        ),
        "pp2": _predict(
            lightning_par.PipelineParallelStrategy(pipeline_parallel_size=2), world, IdsOnly(False)
        ),
        "dp2": _predict(
            lightning_par.TensorParallelStrategy(tensor_parallel_size=1, data_parallel_size=2),
            world,
            IdsOnly(False),
        ),
    }
    out["max_time"] = _max_time_run(world)
    out["bad_ids"] = _bad_predict_ids(world)  # last: the trainer ends in an exception
    return out


def _four_process_runs(rank: int, world: int) -> dict:
    strategy = lightning_par.HybridParallelStrategy(tensor_parallel_size=2, pipeline_parallel_size=2)
    return {"tp2_pp2": _predict(strategy, world, IdsOnly(as_dict=True))}


@functools.cache
def _reference_model() -> GPT:
    model = GPT(**TINY, init_seed=SEED)
    model.configure_model()
    return model.eval()


def _reference_logits(ids: torch.Tensor) -> torch.Tensor:
    """One process, no strategy: the whole padded vocabulary, cut to the real one."""
    with torch.no_grad():
        return _reference_model()(ids)[..., :V]


def _check_predictions(name: str, per_rank: list[list[tuple[torch.Tensor, torch.Tensor]]], dp: int) -> None:
    all_ids = FixedBatches(ROWS, TINY["block_size"], V).ids
    rows = 0
    for rank, batches in enumerate(per_rank):
        for ids, logits in batches:
            assert logits.shape == (*ids.shape, V), f"{name} rank {rank}: shape {tuple(logits.shape)}"
            torch.testing.assert_close(
                logits,
                _reference_logits(ids),
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, r=rank: f"{name} rank {r}: {m}",
            )
            rows += len(ids)
    # Every tp / pp peer predicts every row of its replica; the replicas share the rows out between them.
    assert rows == ROWS * len(per_rank) // dp, f"{name}: {rows} rows predicted over {len(per_rank)} ranks"
    if dp == 1:
        assert torch.equal(torch.cat([ids for ids, _ in per_rank[0]]), all_ids), name


@pytest.fixture(scope="module")
def two_process() -> list[dict]:
    return run_distributed(_two_process_runs, 2, init_process_group=False)


def test_predict_tp2_sp_pp2_dp2_equal_one_process(two_process):
    for name, dp in (("tp2", 1), ("tp2_sp", 1), ("pp2", 1), ("dp2", 2)):
        _check_predictions(name, [r[name] for r in two_process], dp)


def test_predict_tp2_pp2_equals_one_process():
    results = run_distributed(_four_process_runs, 4, init_process_group=False)
    _check_predictions("tp2_pp2", [r["tp2_pp2"] for r in results], dp=1)


def test_max_time_run_keeps_the_rate_constant_after_warmup(two_process):
    for rank, run in enumerate(two_process):
        run = run["max_time"]
        lrs = run["lrs"]
        # Only the timer can stop a run with max_steps=-1 and max_epochs=-1.
        assert run["elapsed"] >= MAX_SECONDS, (rank, run["elapsed"])
        assert run["global_step"] == len(lrs) > WARMUP + 2, (rank, run["global_step"], len(lrs))
        warmup = [LR * (s + 1) / (WARMUP + 1) for s in range(WARMUP)]
        torch.testing.assert_close(torch.tensor(lrs[:WARMUP]), torch.tensor(warmup), rtol=1e-12, atol=0)
        assert lrs[WARMUP:] == [LR] * (len(lrs) - WARMUP), (rank, lrs)
    messages = two_process[0]["max_time"]["warnings"]
    assert any("no finite number of steps" in m and "lr_decay_steps=None" in m for m in messages), messages


def test_bad_inputs_raise_before_any_work(two_process):
    # Under pp=2: every rank raised the same message (the spawn would fail if one raised IndexError or hung).
    assert two_process[0]["bad_ids"] == two_process[1]["bad_ids"]

    model = GPT(**TINY, init_seed=SEED)
    ids = FixedBatches(4, TINY["block_size"], V).ids
    bad = ids.clone()
    bad[2, 5] = V
    batches = [{"input_ids": bad[i], "labels": bad[i]} for i in range(4)]
    with pytest.raises(ValueError, match=rf"input_ids holds the token id {V}, outside .* \(vocab_size={V}\)"):
        quiet_trainer("auto", 1, max_steps=1).fit(model, train_dataloaders=DataLoader(batches, batch_size=4))
    negative = ids.clone()
    negative[0, 0] = -1
    with pytest.raises(
        ValueError, match=r"input_ids holds the token id -1, outside the valid range 0\.\.249"
    ):
        model.check_batch(negative)
    with pytest.raises(ValueError, match=r"input_ids: sequence length 17 exceeds block_size=16"):
        model.check_batch(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a dict with keys \['ids'\]: it needs 'input_ids'"):
        model.predict_step({"ids": ids}, 0)

    short = [{"input_ids": ids[i], "labels": ids[i, :-1]} for i in range(4)]
    with pytest.raises(
        ValueError,
        match=r"labels has shape \(4, 15\) but input_ids has shape \(4, 16\): labels must be aligned",
    ):
        quiet_trainer("auto", 1, limit_val_batches=1).validate(GPT(**TINY), dataloaders=DataLoader(short, 4))

    with pytest.raises(
        ValueError,
        match=r"global_batch_size=10 is not a multiple of micro_batch_size=4.*include \[4, 8, 12, 16\]",
    ):
        GlobalBatchSize(global_batch_size=10, micro_batch_size=4)
