"""Tensor (+ sequence, + data) parallel parity against the one-process reference, through the Trainer."""

from __future__ import annotations

import pytest

import lightning_par
from tests.harness import run_distributed
from tests.parity import TINY, FixedBatches, assert_same_run, reference_run, trainer_run

# After 3 AdamW steps the weights differ from the reference only by fp32 round-off of differently ordered
# sums (partial matmuls summed over tp, vocab-parallel softmax): a few ulps, amplified by Adam's division
# by sqrt(v) for tiny gradients. 1e-5 relative with a 1e-6 absolute floor (gradients near zero) is the
# issue's bar.
RTOL, ATOL = 1e-5, 1e-6
STEPS, MICRO = 3, 4


def _tp_runs(rank: int, world: int, layouts: list[dict]) -> list[dict]:
    data = FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    out = []
    for kw in layouts:
        strategy = lightning_par.TensorParallelStrategy(**kw)
        out.append(trainer_run(strategy, world, STEPS, MICRO, 0.05, data))
    return out if rank == 0 else []


def _check(results: list[dict], layouts: list[dict], dp_sizes: list[int]) -> None:
    data = FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    for got, kw, dp in zip(results, layouts, dp_sizes, strict=True):
        ref = reference_run(STEPS, MICRO * dp, 0.05, data)
        assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=str(kw))


def test_tp2_with_and_without_sequence_parallel():
    layouts = [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 2, "sequence_parallel": True},
        {"tensor_parallel_size": 2, "tp_comm_chunks": 4},
    ]
    results = run_distributed(_tp_runs, 2, [dict(k) for k in layouts], init_process_group=False)[0]
    _check(results, layouts, [1, 1, 1])


@pytest.mark.parametrize("world", [4])
def test_tp4_and_dp2_tp2(world):
    layouts = [
        {"tensor_parallel_size": 4},
        {"tensor_parallel_size": 4, "sequence_parallel": True},
        {"tensor_parallel_size": 2, "data_parallel_size": 2},
        {"tensor_parallel_size": 2, "data_parallel_size": 2, "sequence_parallel": True},
    ]
    results = run_distributed(_tp_runs, world, [dict(k) for k in layouts], init_process_group=False)[0]
    _check(results, layouts, [1, 1, 2, 2])
