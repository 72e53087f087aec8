"""The distributed optimizer (ZeRO-1) against one process, and what it saves per rank.

Parity: 3 AdamW steps with clipping on each layout, with ``distributed_optimizer=True``, against the
independent one-process PyTorch loop of :mod:`tests.parity`: the same losses, global gradient norms and
final weights (the gradients themselves live in the optimizer's shards, not in ``.grad``). Resuming across
data-parallel sizes and with the distributed optimizer on or off is in ``tests/checkpoint``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from lightning_par.optim.distributed import DistributedOptimizer
from tests.harness import run_distributed
from tests.parity import (
    OPTIM,
    SEED,
    TINY,
    FixedBatches,
    merge_ranks,
    quiet_trainer,
    reference_run,
    trainer_run,
)

RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, CLIP = 3, 4, 0.05
MOE = {"n_layer": 4, "num_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2}
FOUR_LAYERS = {"n_layer": 4}


def _data() -> FixedBatches:
    return FixedBatches(64, TINY["block_size"], TINY["vocab_size"], ignore_some=True)


def _strategy(**kw) -> lightning_par.HybridParallelStrategy:
    return lightning_par.HybridParallelStrategy(
        distributed_optimizer=True, **{"tensor_parallel_size": 1, **kw}
    )


def _assert_parity(results: list[dict], dp: int, model_kw: dict, what: str) -> None:
    got = merge_ranks(results)
    ref = reference_run(STEPS, BATCH * dp, CLIP, _data(), model_kw)
    close = dict(rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **close)
    assert len(got["norms"]) == STEPS and min(ref["norms"]) > CLIP  # every step clipped
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), **close)
    assert got["params"].keys() == ref["params"].keys(), what
    for name, r in ref["params"].items():
        # (1e-5 absolute: a fraction of one Adam step on elements whose gradient is at round-off level)
        torch.testing.assert_close(
            got["params"][name], r, rtol=RTOL, atol=1e-5, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _state_bytes(trainer: L.Trainer) -> tuple[int, int, int]:
    """(optimizer state bytes, elements this rank steps, elements of the unsharded model) on this rank."""
    opt = trainer.strategy._raw_optimizers()[0]
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
    dist_opt = trainer.strategy.distributed_optimizers[id(opt)]
    stepped = sum(pc.end - pc.start for pc in dist_opt.pieces.values())
    total = sum(b.offsets[-1] + b.params[-1][1].numel() for b in dist_opt.buckets)
    return state, stepped, total


def _two(rank: int, world: int) -> dict:
    out = {"dp2": trainer_run(_strategy(data_parallel_size=2), world, STEPS, BATCH, CLIP, _data())}
    # What a rank holds: fp32 AdamW moments (8 bytes) for half the elements; bf16 weights get fp32 masters.
    for precision in ("32-true", "bf16-true"):
        L.seed_everything(SEED, verbose=False)
        trainer = quiet_trainer(_strategy(data_parallel_size=2), world, max_steps=1, precision=precision)
        data = FixedBatches(8, TINY["block_size"], TINY["vocab_size"])
        trainer.fit(GPT(**TINY, **OPTIM), DataLoader(data, batch_size=4))
        dist_opt = next(iter(trainer.strategy.distributed_optimizers.values()))
        masters = sum(pc.shard.nbytes for pc in dist_opt.pieces.values() if not pc.is_view)
        out[precision] = (*_state_bytes(trainer), masters)
    return out


def test_dp2_matches_one_process_and_halves_the_optimizer_state():
    results = run_distributed(_two, 2, init_process_group=False, timeout=280)
    _assert_parity([r["dp2"] for r in results], 2, {}, "dp2")
    for precision, master_bytes in (("32-true", 0), ("bf16-true", 4)):
        per_rank = [r[precision] for r in results]
        total = per_rank[0][2]
        # Flat sharding: each rank steps ceil(n / 2) elements (the last one minus the padding) ...
        assert [s for _, s, _, _ in per_rank] == [(total + 1) // 2, total // 2]
        for state, stepped, _, masters in per_rank:
            # ... and holds exactly the moments of those: half of one process's 8 bytes per element,
            assert state == 8 * stepped, precision
            # with an fp32 master copy of the elements it steps when the weights are bf16.
            assert masters == master_bytes * stepped, precision


def _four(rank: int, world: int) -> dict:
    return {
        "dp2 x tp2": trainer_run(  # with sequence parallel (its partial sums over tp come first)
            _strategy(tensor_parallel_size=2, data_parallel_size=2, sequence_parallel=True),
            world,
            STEPS,
            BATCH,
            CLIP,
            _data(),
        ),
        "dp2 x pp2": trainer_run(
            _strategy(data_parallel_size=2, pipeline_parallel_size=2, num_microbatches=2),
            world,
            STEPS,
            BATCH,
            CLIP,
            _data(),
            FOUR_LAYERS,
        ),
        "ep2 in dp4": trainer_run(
            _strategy(data_parallel_size=4, expert_parallel_size=2), world, STEPS, BATCH, CLIP, _data(), MOE
        ),
    }


def test_dp2_tp2_dp2_pp2_and_ep2_match_one_process():
    results = run_distributed(_four, 4, init_process_group=False, timeout=280)
    for what, dp, kw in (("dp2 x tp2", 2, {}), ("dp2 x pp2", 2, FOUR_LAYERS), ("ep2 in dp4", 4, MOE)):
        _assert_parity([r[what] for r in results], dp, kw, what)


def _eight(rank: int, world: int) -> dict:
    strategy = _strategy(
        tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2, num_microbatches=2
    )
    return trainer_run(strategy, world, STEPS, BATCH, CLIP, _data(), FOUR_LAYERS)


def test_tp2_pp2_dp2_on_eight_processes_matches_one_process():
    results = run_distributed(_eight, 8, init_process_group=False, timeout=400)
    _assert_parity(results, 2, FOUR_LAYERS, "tp2 x pp2 x dp2")


def test_non_elementwise_optimizer_is_refused_by_name():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match=r"element-wise optimizers .*got LBFGS"):
        DistributedOptimizer(opt, model, None)  # type: ignore[arg-type]
