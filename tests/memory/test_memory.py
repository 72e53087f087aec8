"""Activation recomputation and the memory report.

One 2-process spawn runs every Trainer check in sequence:

- parity with dropout 0.1: ``full`` and ``selective`` give the loss and gradients of no recomputation in
  the same layout (tp2; pp2 1F1B with a block cut in halves, and the first layer of each stage only;
  pp2 ZBV with MoE layers; ep2; tp2 sequence parallel with MoE layers), with the same routing
  statistics and fewer saved bytes; the collectives that really run (a dispatch mode below the blocks'
  own counts them) show the MoE token exchange is not repeated, nor any collective under ``selective``;
- the report: parameters, gradients and AdamW state of tp2 and dp2 (fp32, bf16-true, and bf16-true with
  the distributed optimizer's fp32 masters) equal the analytical figures; the saved activations of a
  ``full`` layer are its input, ``b x s x h`` floats (the difference between 4 and 2 layers),
  ``selective`` strictly between that and no recomputation; what is logged.

Without processes: bad settings, unchanged names, autocast and RNG in the recompute, a MoE layer's
losses and statistics counted once, the in-place write ``selective`` refuses, nothing left after backward.
"""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning_par.callbacks import MemoryReport
from lightning_par.models import GPT
from lightning_par.models.blocks import MLP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import lightning_par
from lightning_par.experts import MoE
from lightning_par.memory import (
    RecomputedForward,
    SavedTensorCounter,
    apply_activation_checkpointing,
    check_recompute,
    counting,
)
from lightning_par.memory.recompute import _Region
from lightning_par.memory.report import format_table
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, Recorder, quiet_trainer

MOE = {"n_layer": 4, "num_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2}
BATCH, SEQ = 4, TINY["block_size"]
MODES = [None, "full", "selective"]
# (what, strategy arguments, model arguments, recompute settings)
PARITY = [
    ("tp2", {"tensor_parallel_size": 2}, {}, [(m, None) for m in MODES]),
    ("pp2 1f1b", {"pipeline_parallel_size": 2}, {}, [*((m, None) for m in MODES), ("full", 1)]),
    (
        "pp2 zbv moe",
        {"pipeline_parallel_size": 2, "pipeline_schedule": "zbv"},
        MOE,
        [(m, None) for m in MODES],
    ),
    ("ep2", {"data_parallel_size": 2, "expert_parallel_size": 2}, MOE, [(m, None) for m in MODES]),
    (
        "tp2 sequence parallel moe",
        {"tensor_parallel_size": 2, "sequence_parallel": True},
        MOE,
        [(m, None) for m in MODES],
    ),
]


class _Collectives(L.Callback):
    """Counts the c10d collectives that run in training steps: replayed ones never reach this mode."""

    class _Mode(TorchDispatchMode):
        def __init__(self, counts: Counter) -> None:
            super().__init__()
            self.counts = counts

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            if func.namespace == "c10d":
                self.counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._mode: Any = None

    def on_train_batch_start(self, *args: Any) -> None:
        self._mode = self._Mode(self.counts)
        self._mode.__enter__()

    def on_train_batch_end(self, *args: Any) -> None:
        self._mode.__exit__(None, None, None)


class _Metrics(Logger):
    """Keeps what is logged (the memory report's ``memory/...`` metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def _fit(
    strategy: dict, model_kw: dict, steps: int, dropout: float, callbacks: list, **trainer_kw: Any
) -> Any:
    L.seed_everything(SEED, verbose=False)
    model = GPT(**{**TINY, "dropout": dropout, **model_kw}, **OPTIM)
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**strategy),
        2,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **trainer_kw,
    )
    data = FixedBatches(2 * BATCH * steps, SEQ, TINY["vocab_size"], ignore_some=True)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=BATCH, shuffle=False))
    return trainer


def _recomputed(trainer: L.Trainer) -> tuple[list[list[str]], list[list[str]]]:
    """Per stage this rank runs (the network without pipeline parallel): the recomputed blocks' keys, and
    the keys of every block the stage runs."""
    runner = trainer.strategy.pipeline
    network = trainer.lightning_module.model
    views = [v for _, v in sorted(runner.views.items())] if runner is not None else [network]
    wrapped = [
        [k for k, b in v.layers.items() if isinstance(b.__dict__.get("forward"), RecomputedForward)]
        for v in views
    ]
    return wrapped, [list(v.layers) for v in views]


def _two(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"parity": {}, "report": {}}
    for what, strategy, model_kw, settings in PARITY:
        for mode, k in settings:
            rec, report, collectives = Recorder(), MemoryReport(), _Collectives()
            args = {**strategy, "activation_checkpointing": mode, "recompute_num_layers": k}
            trainer = _fit(args, model_kw, 2, 0.1, [rec, report, collectives])
            out["parity"][what, mode, k] = {
                "losses": rec.losses,
                "grads": rec.grads,
                "moe": rec.moe,
                "collectives": collectives.counts,
                "recomputed": _recomputed(trainer),
                "report": report.report,
            }
    for n_layer in (2, 4):
        for mode in MODES:
            report, logger = MemoryReport(step=0), _Metrics()
            args = {"data_parallel_size": 2, "activation_checkpointing": mode}
            _fit(args, {"n_layer": n_layer}, 1, 0.0, [report], logger=logger)
            out["report"]["dp2", n_layer, mode] = report.reports
            out["logged"] = logger.logged
    report = MemoryReport(step=0)
    _fit({"data_parallel_size": 2}, {}, 1, 0.0, [report], precision="bf16-true")
    out["report"]["dp2 bf16-true"] = report.reports
    # The distributed optimizer steps half of the elements on each rank, from fp32 master copies.
    report = MemoryReport(step=0)
    args = {"data_parallel_size": 2, "distributed_optimizer": True}
    trainer = _fit(args, {}, 1, 0.0, [report], precision="bf16-true")
    out["report"]["dp2 bf16-true distributed"] = report.report
    out["pieces"] = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)
    return out


def _elements(tp: int) -> tuple[int, int]:
    """(local parameter elements, parameter tensors) of ``GPT(**TINY)`` on one of ``tp`` ranks."""
    h, vocab, layers = TINY["n_embd"], 256, TINY["n_layer"]  # (250 padded to a multiple of 64)
    column = lambda i, o: (i * o + o) // tp  # noqa: E731  (weight and bias split by output)
    row = lambda i, o: i * o // tp + o  # noqa: E731  (weight split by input, bias whole)
    per_layer = 2 * h + column(h, 3 * h) + row(h, h) + 2 * h + column(h, 4 * h) + row(4 * h, h)
    tied_embedding = vocab * h // tp
    return tied_embedding + SEQ * h + layers * per_layer + 2 * h, 2 + 12 * layers + 2


@pytest.fixture(scope="module")
def two() -> list[dict[str, Any]]:
    return run_distributed(_two, 2, init_process_group=False, timeout=280)


def test_recompute_matches_no_recompute_with_dropout(two):
    for what, _, model_kw, settings in PARITY:
        for rank, result in enumerate(two):
            runs = result["parity"]
            ref = runs[what, None, None]
            for mode, k in settings[1:]:
                got, name = runs[what, mode, k], f"{what} {mode} k={k} rank {rank}"
                assert len(got["losses"]) == len(ref["losses"]) == 2, name
                torch.testing.assert_close(
                    torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0, msg=name
                )
                for step, (g, r) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
                    assert g.keys() == r.keys() and r, name
                    for param in r:
                        torch.testing.assert_close(
                            g[param], r[param], rtol=1e-6, atol=0, msg=f"{name} step {step} {param}"
                        )
                assert got["moe"] == ref["moe"], name  # routing statistics counted once, not again
                if model_kw:
                    assert any(v for step in got["moe"] for v in step.values()), name
                # The token exchange runs as often as without recomputation: it is replayed.
                assert got["collectives"]["alltoall_base_"] == ref["collectives"]["alltoall_base_"], name
                if mode == "selective":
                    assert got["collectives"] == ref["collectives"], name  # every collective replayed
                peak = got["report"]["activations_peak"]
                assert 0 < peak < ref["report"]["activations_peak"], name


def test_recompute_chooses_the_layers_of_each_stage(two):
    for rank, result in enumerate(two):
        runs = result["parity"]
        assert runs["tp2", "full", None]["recomputed"] == ([["0", "1"]], [["0", "1"]])
        assert runs["tp2", None, None]["recomputed"] == ([[]], [["0", "1"]])
        # pp2 1F1B cuts TINY's layer 1 between its attention (stage 0) and MLP (stage 1): each half is a
        # block of its stage.
        per_stage = [["0", "1"], ["1"]][rank]
        assert runs["pp2 1f1b", "selective", None]["recomputed"] == ([per_stage], [per_stage])
        assert runs["pp2 1f1b", "full", 1]["recomputed"] == ([per_stage[:1]], [per_stage])
        wrapped, stages = runs["pp2 zbv moe", "full", None]["recomputed"]
        assert wrapped == stages and len(stages) == 2  # (ZBV: two stages per rank)
        # tp2 full runs its all-reduces again in backward (selective replays them).
        tp = {m: runs["tp2", m, None]["collectives"]["allreduce_"] for m in MODES}
        assert tp["full"] > tp[None] == tp["selective"]


def test_report_counts_parameters_gradients_and_optimizer_state(two):
    for rank, result in enumerate(two):
        elements, tensors = _elements(tp=2)
        report = result["parity"]["tp2", None, None]["report"]
        assert report["params"] == 4 * elements, rank
        assert report["grads"] == 4 * elements
        assert report["optimizer_moments"] == 8 * elements + 4 * tensors  # exp_avg, exp_avg_sq; fp32 step
        assert report["optimizer_master"] == 0 and report["optimizer"] == report["optimizer_moments"]
        assert report["cuda_max_allocated"] is None and report["activations_peak"] > 0
        elements, tensors = _elements(tp=1)
        for precision, size in (("32-true", 4), ("bf16-true", 2)):
            reports = result["report"]["dp2", 2, None] if size == 4 else result["report"]["dp2 bf16-true"]
            assert reports[0] == reports[1], precision  # dp replicas hold the same
            got = reports[rank]
            assert (got["params"], got["grads"]) == (size * elements, size * elements), precision
            assert got["optimizer_moments"] == 2 * size * elements + 4 * tensors, precision
            assert got["optimizer_master"] == 0, precision
        got = result["report"]["dp2 bf16-true distributed"]
        assert (got["params"], got["grads"]) == (2 * elements, 2 * elements)
        assert got["optimizer_master"] == 4 * elements // 2  # (34176 elements: no padding)
        assert got["optimizer_moments"] == 8 * elements // 2 + 4 * result["pieces"]
        assert got["optimizer"] == got["optimizer_master"] + got["optimizer_moments"]


def test_report_counts_the_activations_recomputation_keeps(two):
    reports = two[0]["report"]
    per_layer = {
        m: (reports["dp2", 4, m][0]["activations_peak"] - reports["dp2", 2, m][0]["activations_peak"]) // 2
        for m in MODES
    }
    block_input = BATCH * SEQ * TINY["n_embd"] * 4
    assert per_layer["full"] == block_input
    assert block_input < per_layer["selective"] < per_layer[None]
    table = format_table(reports["dp2", 2, "full"])
    assert "activations_peak" in table and "MiB" in table and len(table.splitlines()) == 4
    # Logged at the measured step: the largest over ranks, and each rank's (no CUDA figure on CPU).
    step, logged = next((step, m) for step, m in two[0]["logged"] if "memory/params" in m)
    last = reports["dp2", 4, "selective"]
    assert step == 1 and logged["memory/activations_peak"] == max(r["activations_peak"] for r in last)
    assert logged["memory/rank1/optimizer_moments"] == last[1]["optimizer_moments"]
    assert not any("cuda_max_allocated" in k for k in logged)


# ---- no processes -------------------------------------------------------------------------------------
def test_bad_recompute_settings_are_named():
    with pytest.raises(
        ValueError,
        match=r"activation_checkpointing='partial' is not valid; valid values: None, 'full', 'selective'",
    ):
        check_recompute("partial", None)
    with pytest.raises(ValueError, match=r"recompute_num_layers=0 is not valid: it must be None"):
        check_recompute("full", 0)
    with pytest.raises(ValueError, match=r"recompute_num_layers=2.0 is not valid"):
        check_recompute("selective", 2.0)
    with pytest.raises(ValueError, match=r"recompute_num_layers=2 needs activation_checkpointing='full' or"):
        check_recompute(None, 2)
    with pytest.raises(ValueError, match=r"does not combine with tp_comm_chunks=2"):
        check_recompute("full", None, tp_comm_chunks=2)
    check_recompute(None, None)
    check_recompute("full", 3)
    with pytest.raises(ValueError, match=r"activation_checkpointing='some' is not valid"):
        lightning_par.HybridParallelStrategy(activation_checkpointing="some")
    with pytest.raises(ValueError, match=r"recompute_num_layers=-1 is not valid"):
        lightning_par.HybridParallelStrategy(activation_checkpointing="full", recompute_num_layers=-1)

    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(2, 2))

    with pytest.raises(TypeError, match=r"needs the network in `NoLayers.model` with its blocks in `layers"):
        apply_activation_checkpointing(NoLayers(), "full")
    with pytest.raises(ValueError, match=r"step=-1 is not valid"):
        MemoryReport(step=-1)


def test_names_do_not_change():
    model = GPT(**TINY)
    model.configure_model()
    before = list(model.state_dict())
    apply_activation_checkpointing(model, "selective", 1)
    assert list(model.state_dict()) == before
    wrapped = [isinstance(b.__dict__.get("forward"), RecomputedForward) for b in model.model.layers.values()]
    assert wrapped == [True, False]  # (the first layer only)


def test_recompute_under_autocast_gives_the_same_gradients_and_leaves_the_rng_stream():
    """The recompute runs under the forward's autocast and RNG state (bf16 saved tensors, same dropout
    masks), in a fork: the numbers drawn after the step are those drawn without recomputation."""
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = GPT(**{**TINY, "dropout": 0.1})
        model.configure_model()
        apply_activation_checkpointing(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, count = model._loss({"input_ids": ids, "labels": ids})
        (loss_sum / count).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        runs[mode] = (loss_sum.detach(), grads, torch.rand(4))
    for mode in ("full", "selective"):
        torch.testing.assert_close(runs[mode][0], runs[None][0], rtol=1e-6, atol=0)
        for name, ref in runs[None][1].items():
            torch.testing.assert_close(runs[mode][1][name], ref, rtol=1e-6, atol=0, msg=f"{mode} {name}")
        assert torch.equal(runs[mode][2], runs[None][2]), mode


def _network_of(block: nn.Module, mode: str | None) -> nn.Module:
    """A module whose network (``model``) has the one block, recomputed with ``mode``."""
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleDict({"0": block})
    apply_activation_checkpointing(holder, mode)
    return holder


class _PostNormMoE(nn.Module):
    """A block that saves tensors after its MoE layer (a norm), so the recompute runs the MoE's end."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoE(8, 4, lambda: MLP(8, 16, True, 0.1), top_k=2)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.moe(x))


def test_a_recomputed_moe_layer_counts_its_losses_and_statistics_once():
    """What a pipeline runner does: aux gradients injected with a loss scale, recording off outside forward
    calls. The recompute runs the MoE layer with its forward's settings (the same saved tensors) and
    leaves its aux losses and routing statistics as the forward left them."""
    x0 = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        holder = _network_of(_PostNormMoE(), mode)
        moe = holder.model.layers["0"].moe
        for scale in (torch.tensor(0.5), None):
            holder.zero_grad()
            x = x0.clone().requires_grad_()
            moe.aux_grad_scale = scale
            y = holder.model.layers["0"](x)
            moe.record, moe.aux_grad_scale = False, None
            aux = moe.pop_aux()
            loss = y.square().sum() + (aux if scale is None else 0.0)
            loss.backward()
            moe.record = True
            assert moe.pop_aux() is None, mode  # nothing added in backward
            runs[mode, scale is None] = (
                aux.detach(),
                moe.pop_stats(),
                x.grad.clone(),
                moe.router.gate.weight.grad,
            )
    for mode in ("full", "selective"):
        for plain in (False, True):
            for got, ref in zip(runs[mode, plain], runs[None, plain], strict=True):
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=0, msg=f"{mode} plain={plain}")


class _WritesIntoMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).add_(1.0).tanh()


def test_selective_refuses_an_in_place_write_into_a_saved_matmul_output():
    """The saved output already holds the write: the recompute would add 1 twice. ``full`` is exact."""
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"aten.add_.Tensor writes in place into a matmul or attention"):
        _network_of(_WritesIntoMatmul(), "selective").model.layers["0"](x)
    grads = []
    for mode in (None, "full"):
        torch.manual_seed(0)
        block = _network_of(_WritesIntoMatmul(), mode).model.layers["0"]
        block(x).sum().backward()
        grads.append(block.lin.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)


def test_what_a_recomputed_block_keeps_is_freed_with_its_graph():
    """By reference counting alone (no cycle through autograd's C++ nodes): nothing is left after backward,
    and the counted saved bytes go back to zero."""
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    gc.disable()
    try:
        for mode in MODES:
            model = GPT(**{**TINY, "dropout": 0.1})
            model.configure_model()
            apply_activation_checkpointing(model, mode)
            counter = SavedTensorCounter([*model.parameters(), *model.buffers()])
            with counting(counter):
                loss_sum, count = model._loss({"input_ids": ids, "labels": ids})
                assert counter.live > 0
                (loss_sum / count).backward()
            del loss_sum, count
            assert counter.live == 0 and counter.peak > 0, mode
            assert not [o for o in gc.get_objects() if type(o) is _Region], mode
    finally:
        gc.enable()
