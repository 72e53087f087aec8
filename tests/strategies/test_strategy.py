"""Strategy behaviour beyond training parity: validation, batches per rank, collectives, HF under tp, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_par.models import GPT
from lightning_par.models.gpt import gather_vocab
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import TINY, FixedBatches, quiet_trainer, save_tiny_gpt2

VAL_DATA = dict(n=24, seq_len=TINY["block_size"], vocab=TINY["vocab_size"], seed=7)


class BatchFingerprint(L.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16])


def _validate_and_batches(rank: int, world: int, strategy_kw: dict) -> dict:
    """trainer.validate on a fresh model; then 2 training steps recording which batch each rank saw."""
    L.seed_everything(5, verbose=False)
    model = GPT(**TINY)
    val = quiet_trainer(lightning_par.TensorParallelStrategy(**strategy_kw), world).validate(
        model, DataLoader(FixedBatches(**VAL_DATA), batch_size=4), verbose=False
    )[0]
    fp = BatchFingerprint()
    L.seed_everything(5, verbose=False)
    trainer = quiet_trainer(
        lightning_par.TensorParallelStrategy(**strategy_kw), world, max_steps=2, callbacks=[fp]
    )
    trainer.fit(GPT(**TINY), DataLoader(FixedBatches(32, 16, TINY["vocab_size"]), batch_size=4))
    mesh = trainer.strategy.device_mesh
    return {
        "val": val,
        "batches": fp.seen,
        "dp_rank": mesh["dp"].get_local_rank(),
        "tp_rank": mesh["tp"].get_local_rank(),
    }


def _reference_val_loss() -> float:
    L.seed_everything(5, verbose=False)
    model = GPT(**TINY)
    model.configure_model()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(FixedBatches(**VAL_DATA), batch_size=4):
            s, n = model._loss(batch)
            loss_sum, count = loss_sum + float(s), count + int(n)
    return loss_sum / count


def _assert_validate_and_batches(results: list[dict]) -> None:
    ref = _reference_val_loss()
    for r in results:
        # val/loss is a token-weighted mean of fp32 sums taken in another order: fp32 round-off.
        assert r["val"]["val/loss"] == pytest.approx(ref, rel=1e-5)
        assert r["val"]["val/ppl"] == pytest.approx(float(torch.exp(torch.tensor(ref))), rel=1e-5)
    by_dp: dict[int, list[list[str]]] = {}
    for r in results:
        by_dp.setdefault(r["dp_rank"], []).append(r["batches"])
    for dp_rank, seen in by_dp.items():
        assert all(s == seen[0] for s in seen), f"tp peers of dp rank {dp_rank} saw different batches"
    if len(by_dp) > 1:
        firsts = [seen[0] for seen in by_dp.values()]
        assert firsts[0] != firsts[1], "data-parallel replicas saw the same batches"


def test_validate_and_batches_tp2():
    _assert_validate_and_batches(run_distributed(_validate_and_batches, 2, {}, init_process_group=False))


def test_validate_and_batches_dp2_tp2():
    kw = {"tensor_parallel_size": 2, "data_parallel_size": 2}
    _assert_validate_and_batches(run_distributed(_validate_and_batches, 4, kw, init_process_group=False))


def _layer_checks(rank: int, world: int, hf_dir: str) -> dict:
    """Collective counts per block, vocab padding, HF parity at tp=2 and a bad model layout, in one spawn."""
    import torch.distributed as dist
    from lightning_par.models.blocks import Block, block_tp_plan
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import GPT2LMHeadModel

    import lightning_par.tensor_parallel.comm as tpmod

    out: dict = {}
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))

    # 1. Collectives: one all-reduce per block half in forward and one in backward (no SP, no chunking);
    #    with sequence parallel, reduce-scatter / all-gather instead and no all-reduce.
    for sp in (False, True):
        torch.manual_seed(0)
        block = torch.nn.ModuleDict({"b": Block(32, 4)})
        parallelize_module(block, mesh, block_tp_plan("b", sp))
        counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
        originals = {
            k: getattr(tpmod, n)
            for k, n in (
                ("all_reduce", "all_reduce"),
                ("all_gather", "all_gather_dim0"),
                ("reduce_scatter", "reduce_scatter_dim0"),
            )
        }

        def counting(kind, fn, counts=counts):
            def wrapped(*args, **kwargs):
                counts[kind] += 1
                return fn(*args, **kwargs)

            return wrapped

        tpmod.all_reduce = counting("all_reduce", originals["all_reduce"])
        tpmod.all_gather_dim0 = counting("all_gather", originals["all_gather"])
        tpmod.reduce_scatter_dim0 = counting("reduce_scatter", originals["reduce_scatter"])
        try:
            x = torch.randn(16 // (world if sp else 1), 2, 32, requires_grad=True)
            y = block["b"](x)
            fwd = dict(counts)
            y.sum().backward()
            bwd = {k: counts[k] - fwd[k] for k in counts}
        finally:
            tpmod.all_reduce = originals["all_reduce"]
            tpmod.all_gather_dim0 = originals["all_gather"]
            tpmod.reduce_scatter_dim0 = originals["reduce_scatter"]
        out[f"comm_sp{sp}"] = (fwd, bwd)

    # 2. HF parity at tp=2 with a vocabulary (1001) that tp does not divide, and padded rows inert.
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = GPT.from_hf(hf_dir)
    trainer = quiet_trainer(lightning_par.TensorParallelStrategy(), world)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1001, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    trainer.validate(
        model,
        DataLoader([{"input_ids": ids[i], "labels": labels[i]} for i in range(3)], batch_size=3),
        verbose=False,
    )
    with torch.no_grad():
        logits = gather_vocab(model.model(ids), model.model.head.tp).transpose(0, 1)
        loss_sum, n = model._loss({"input_ids": ids, "labels": labels})
        ref = hf(ids, labels=labels)
        out["hf_logits_diff"] = float((logits[..., :1001] - ref.logits).abs().max())
        out["hf_loss"] = (float(loss_sum / n), float(ref.loss))
        # Overwrite the padded vocabulary rows with large values: the loss must not move.
        weight = model.model.embed.wte.weight.to_local()
        start = model.model.embed.wte.tp.vocab_start
        pad_from = max(0, 1001 - start)
        weight[pad_from:] = 50.0
        loss_sum2, _ = model._loss({"input_ids": ids, "labels": labels})
        out["padded_rows_loss"] = (float(loss_sum / n), float(loss_sum2 / n))
        out["padded_vocab"] = model.model.padded_vocab

    # 3. A model that tp cannot split fails in setup, before any step, naming the value.
    try:
        quiet_trainer(lightning_par.TensorParallelStrategy(), world, max_steps=1).fit(
            GPT(vocab_size=64, n_layer=1, n_head=3, n_embd=24, block_size=8),
            DataLoader(FixedBatches(4, 8, 64), batch_size=2),
        )
        out["bad_heads"] = None
    except ValueError as err:
        out["bad_heads"] = str(err)
    dist.barrier()
    return out


def test_layer_checks_tp2(tmp_path):
    save_tiny_gpt2(tmp_path)
    results = run_distributed(_layer_checks, 2, str(tmp_path))
    for r in results:
        assert r["comm_spFalse"] == (
            {"all_reduce": 2, "all_gather": 0, "reduce_scatter": 0},
            {"all_reduce": 2, "all_gather": 0, "reduce_scatter": 0},
        )
        assert r["comm_spTrue"] == (
            {"all_reduce": 0, "all_gather": 2, "reduce_scatter": 2},
            {"all_reduce": 0, "all_gather": 2, "reduce_scatter": 2},
        )
        # HF and we sum in different orders (fused vs split q/k/v, vocab-parallel softmax): fp32 round-off.
        assert r["hf_logits_diff"] < 1e-5
        assert r["hf_loss"][0] == pytest.approx(r["hf_loss"][1], rel=1e-5)
        assert r["padded_vocab"] == 1024
        assert r["padded_rows_loss"][0] == r["padded_rows_loss"][1]
        assert (
            r["bad_heads"] is not None
            and "n_head=3" in r["bad_heads"]
            and "tensor_parallel_size=2" in r["bad_heads"]
        )


def test_bad_layouts_raise_before_any_process_starts():
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=2 does not divide the number of processes.*3"
    ):
        L.Trainer(
            accelerator="cpu",
            devices=3,
            strategy=lightning_par.TensorParallelStrategy(tensor_parallel_size=2),
        )
    with pytest.raises(
        ValueError, match=r"data_parallel_size=2 x tensor_parallel_size=2.*= 4, but 2 processes"
    ):
        L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=lightning_par.TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=2),
        )
    with pytest.raises(ValueError, match=r"tensor_parallel_size=0 is not valid"):
        lightning_par.TensorParallelStrategy(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"tp_comm_chunks=0 is not valid"):
        lightning_par.TensorParallelStrategy(tp_comm_chunks=0)
    with pytest.raises(TypeError, match="bogus_option"):
        lightning_par.TensorParallelStrategy(bogus_option=1)
    with pytest.raises(ValueError, match=r"n_embd=30 must be divisible by n_head=4"):
        GPT(n_embd=30, n_head=4)


def test_strategy_names_are_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["tp"]["strategy"] is lightning_par.TensorParallelStrategy
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy="tp", logger=False)
    assert isinstance(trainer.strategy, lightning_par.TensorParallelStrategy)
    assert (trainer.strategy.layout.tp, trainer.strategy.layout.dp) == (4, 1)


def _auto(rank: int, world: int, tmp: str) -> dict:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_par.planner import choose_layout

    L.seed_everything(5, verbose=False)
    model = GPT(**TINY)
    logger = CSVLogger(tmp, name="auto")
    strategy = lightning_par.HybridParallelStrategy(layout="auto", planner_device="a100-80gb")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(FixedBatches(**VAL_DATA), batch_size=4))
    layout = trainer.strategy.layout
    direct = choose_layout(GPT(**TINY), world, world, "a100-80gb", precision="32-true")
    return {
        "plan": trainer.strategy.plan.strategy_kwargs(),
        "direct": direct.strategy_kwargs(),
        "layout": (layout.tp, layout.pp, layout.dp, layout.ep, layout.sequence_parallel),
        "steps": trainer.global_step,
        "hparams": Path(logger.log_dir, "hparams.yaml").read_text() if rank == 0 else None,
    }


def test_auto_parallel_runs_the_planners_layout_and_logs_it(tmp_path):
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["auto_parallel"]["init_params"] == {"layout": "auto"}
    results = run_distributed(_auto, 2, str(tmp_path), init_process_group=False)
    for r in results:
        plan = r["plan"]
        assert plan == r["direct"] == results[0]["plan"]  # the planner's pick, the same on every rank
        expected = (
            plan["tensor_parallel_size"],
            plan["pipeline_parallel_size"],
            plan["data_parallel_size"],
            plan["expert_parallel_size"],
            plan["sequence_parallel"],
        )
        assert r["layout"] == expected and r["steps"] == 2
    logged = results[0]["hparams"]  # (what the loggers got: the choice and its prediction)
    assert "auto_parallel/tensor_parallel_size:" in logged and "auto_parallel/step_s:" in logged, logged
    with pytest.raises(ValueError, match=r"layout='bogus' is not valid"):
        lightning_par.HybridParallelStrategy(layout="bogus")
    from lightning_par.strategies.auto import planner_device

    with pytest.raises(ValueError, match=r"layout='auto' on cpu needs planner_device="):
        planner_device("cpu", None)
