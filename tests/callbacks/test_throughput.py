"""ParallelThroughputMonitor: global figures count data-parallel replicas only; FLOPs follow the config."""

from __future__ import annotations

import csv

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from lightning_par.callbacks import ParallelThroughputMonitor
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import SEED, TINY, FixedBatches, quiet_trainer


def _fit(rank: int, world: int, tmp: str) -> None:
    L.seed_everything(SEED, verbose=False)
    strategy = lightning_par.HybridParallelStrategy(tensor_parallel_size=2, data_parallel_size=2)
    trainer = quiet_trainer(
        strategy,
        world,
        max_steps=6,
        log_every_n_steps=1,
        logger=CSVLogger(tmp, name="t", version=0),
        callbacks=[ParallelThroughputMonitor(window_size=2)],
    )
    trainer.fit(GPT(**TINY), DataLoader(FixedBatches(64, 16, TINY["vocab_size"]), batch_size=4))


def test_throughput_counts_replicas_and_model_flops(tmp_path):
    run_distributed(_fit, 4, str(tmp_path), init_process_group=False)
    rows = list(csv.DictReader(open(tmp_path / "t" / "version_0" / "metrics.csv")))
    rows = [r for r in rows if r.get("train/samples_per_sec")]
    assert rows, "no throughput logged"
    flops_per_token = GPT(**TINY).flops_per_token(16)
    for r in rows:
        value = {k: float(v) for k, v in r.items() if v and k.startswith("train/")}
        # dp=2 replicas of tp=2: the global figures are twice one replica's, not four times.
        assert value["train/samples_per_sec"] == pytest.approx(2 * value["train/device/samples_per_sec"])
        assert value["train/items_per_sec"] == pytest.approx(16 * value["train/samples_per_sec"])
        # Both come from the same window of steps: the ratio is the model's FLOPs per token (fp round-off).
        assert value["train/flops_per_sec"] == pytest.approx(
            flops_per_token * value["train/items_per_sec"], rel=1e-6
        )
        assert "train/device/mfu" not in value  # no peak FLOP/s on CPU: achieved FLOP/s only
