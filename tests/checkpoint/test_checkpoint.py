"""Sharded checkpoints: resume on the same layout (bitwise) and on others, atomic saves, crafted files refused.

The runs train ``GPT(**TINY, n_layer=4)`` on fixed data, 4 steps per epoch, so a checkpoint taken after
step 4 resumes at an epoch boundary.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_par.models import GPT
from torch.utils.data import DataLoader

import lightning_par
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, quiet_trainer

MODEL = {**TINY, "n_layer": 4}
GLOBAL_BATCH, SAVE_AT, TOTAL = 8, 4, 8
EXPORT_IDS = torch.arange(2 * 16).reshape(2, 16) % TINY["vocab_size"]

LAYOUTS = {
    "tp1": ({"tensor_parallel_size": 1}, 1),
    "tp2": ({"tensor_parallel_size": 2}, 2),
    "tp4": ({"tensor_parallel_size": 4}, 4),
    "pp2": ({"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "num_microbatches": 2}, 2),
    "pp4": ({"tensor_parallel_size": 1, "pipeline_parallel_size": 4, "num_microbatches": 4}, 4),
    "dp2": ({"tensor_parallel_size": 1, "data_parallel_size": 2}, 2),
    "tp2_pp2": ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "num_microbatches": 2}, 4),
    # the distributed optimizer (its state saved per parameter, as without it)
    "tp1_do": ({"tensor_parallel_size": 1, "distributed_optimizer": True}, 1),
    "dp2_do": ({"tensor_parallel_size": 1, "data_parallel_size": 2, "distributed_optimizer": True}, 2),
    "dp4_do": ({"tensor_parallel_size": 1, "data_parallel_size": 4, "distributed_optimizer": True}, 4),
}


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def _fit(
    name: str,
    world: int,
    max_steps: int,
    ckpt_dir: str | None,
    resume: str | None,
    logits: bool = False,
    save_every: int = SAVE_AT,
    dropout: float = 0.0,
) -> list[float] | tuple[list[float], torch.Tensor]:
    kw, size = LAYOUTS[name]
    assert size == world, (name, world)
    dp = kw.get("data_parallel_size", 1)
    L.seed_everything(SEED, verbose=False)
    losses = Losses()
    callbacks: list = [losses]
    if ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=save_every, save_top_k=0)
        )
    trainer = quiet_trainer(
        lightning_par.HybridParallelStrategy(**kw),
        world,
        max_steps=max_steps,
        gradient_clip_val=0.05,
        callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None,
    )
    data = FixedBatches(GLOBAL_BATCH * SAVE_AT, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    model = GPT(**{**MODEL, "dropout": dropout}, **OPTIM)
    trainer.fit(model, DataLoader(data, batch_size=GLOBAL_BATCH // dp), ckpt_path=resume)
    if logits:  # the trained model's logits on fixed ids (every pipeline rank returns them)
        with torch.no_grad():
            return losses.values, model(EXPORT_IDS)
    return losses.values


def _phase(rank: int, world: int, tmp: str, jobs: list[tuple]) -> dict:
    """Run ``(kind, layout, source)`` jobs: ``save`` 4 steps, ``straight`` 8 steps, ``resume`` from a save."""
    out = {}
    for kind, name, source in jobs:
        if kind == "save" and name == "pp2":
            out[(kind, name)], out["pp2_logits"] = _fit(
                name, world, SAVE_AT, f"{tmp}/{name}", None, logits=True
            )
        elif kind == "save":
            out[(kind, name)] = _fit(name, world, SAVE_AT, f"{tmp}/{name}", None)
        elif kind == "save_mid":  # after 2 of the epoch's 4 steps
            out[(kind, name)] = _fit(name, world, 2, f"{tmp}/{name}_mid", None, save_every=2)
        elif kind == "resume_mid":
            out[(kind, name)] = _fit(name, world, TOTAL, None, f"{tmp}/{name}_mid/last.ckpt")
        elif kind == "straight_dropout":  # the generators' states are in the checkpoint too
            out[(kind, name)] = _fit(name, world, TOTAL, None, None, dropout=0.1)
        elif kind == "save_dropout":
            out[(kind, name)] = _fit(name, world, SAVE_AT, f"{tmp}/{name}_dropout", None, dropout=0.1)
        elif kind == "resume_dropout":
            out[(kind, name)] = _fit(name, world, TOTAL, None, f"{tmp}/{name}_dropout/last.ckpt", dropout=0.1)
        elif kind == "straight":
            out[(kind, name)] = _fit(name, world, TOTAL, None, None)
        else:
            out[(kind, name, source)] = _fit(
                name, world, TOTAL, f"{tmp}/resume_{name}_from_{source}", f"{tmp}/{source}/last.ckpt"
            )
    return out


def test_resume_same_layout_bitwise_and_resharded(tmp_path):
    tmp = str(tmp_path)
    r1 = run_distributed(
        _phase, 1, tmp, [("straight", "tp1", None), ("save", "tp1", None)], init_process_group=False
    )[0]
    r2 = run_distributed(
        _phase,
        2,
        tmp,
        [
            ("straight", "tp2", None),
            ("save", "tp2", None),
            ("resume", "tp2", "tp2"),
            ("save_mid", "tp2", None),
            ("resume_mid", "tp2", None),
            ("straight_dropout", "tp2", None),
            ("save_dropout", "tp2", None),
            ("resume_dropout", "tp2", None),
            ("save", "pp2", None),
            ("save", "dp2", None),
            ("save", "dp2_do", None),
            ("resume", "dp2", "dp2_do"),
            ("resume", "dp2_do", "dp2"),
            ("straight", "pp2", None),
            ("resume", "pp2", "pp2"),
        ],
        init_process_group=False,
        timeout=280,
    )[0]
    r4 = run_distributed(
        _phase,
        4,
        tmp,
        [
            ("resume", "tp4", "tp1"),
            ("resume", "pp4", "pp2"),
            ("save", "pp4", None),
            ("resume", "tp2_pp2", "dp2"),
            ("resume", "dp4_do", "dp2_do"),
        ],
        init_process_group=False,
        timeout=280,
    )[0]
    r1b = run_distributed(
        _phase,
        1,
        tmp,
        [
            ("resume", "tp1", "tp2"),
            ("resume", "tp1", "pp4"),
            ("resume", "tp1", "dp2"),
            ("resume", "tp1_do", "dp2_do"),
            ("resume", "tp1", "dp2_do"),
        ],
        init_process_group=False,
    )[0]
    straight = r1[("straight", "tp1")]
    assert len(straight) == TOTAL

    # Same layout: the continuation is bitwise the uninterrupted run, also from the middle of an epoch
    # (the data position is in the checkpoint).
    assert r2[("resume", "tp2", "tp2")] == r2[("straight", "tp2")][SAVE_AT:]
    assert r2[("resume_mid", "tp2")] == r2[("straight", "tp2")][2:]
    # With dropout the random generators continue from the checkpoint (at an epoch boundary: mid-epoch,
    # the data loader's new iterator draws one seed that the uninterrupted run did not).
    assert r2[("resume_dropout", "tp2")] == r2[("straight_dropout", "tp2")][SAVE_AT:]
    assert r2[("straight_dropout", "tp2")] != r2[("straight", "tp2")]
    assert r2[("resume", "pp2", "pp2")] == r2[("straight", "pp2")][SAVE_AT:]
    # Other layouts: every layout computes the same numbers to fp32 round-off (the parity tests' bar).
    # With the distributed optimizer (do) the state is saved per parameter: dp2 with it resumes on dp1, on
    # dp4, and without it; and the other way round.
    resumed = {k: v for k, v in {**r2, **r4, **r1b}.items() if k[0] == "resume" and k[1:] != ("tp2", "tp2")}
    resumed.pop(("resume", "pp2", "pp2"))
    assert len(resumed) == 11
    for key, losses in resumed.items():
        assert len(losses) == TOTAL - SAVE_AT, key
        torch.testing.assert_close(
            torch.tensor(losses),
            torch.tensor(straight[SAVE_AT:]),
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, k=key: f"{k}: {m}",
        )
    # The saves left no partial directories behind.
    assert not list(tmp_path.rglob(".last.ckpt.partial-*"))

    # export-hf: one process, no layout; Hugging Face gives the logits the pp=2 run's model gave.
    from transformers import GPT2LMHeadModel

    from lightning_par.cli import main

    out = tmp_path / "hf"
    main(["export-hf", str(tmp_path / "pp2" / "last.ckpt"), str(out)])
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(EXPORT_IDS).logits
    # HF and we sum in different orders (fused vs split q/k/v): fp32 round-off.
    torch.testing.assert_close(r2["pp2_logits"][..., : TINY["vocab_size"]], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match="out_dir=.* exists and is not empty"):
        main(["export-hf", str(tmp_path / "pp2" / "last.ckpt"), str(out)])


# ---- crafted files, killed saves ----------------------------------------------------------------------
class _Marker:
    """Unpickling this creates a file: the proof that a load ran code from a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _resume_each_swapped(rank: int, world: int, tmp: str) -> dict:
    import shutil

    _fit("tp1", world, SAVE_AT, f"{tmp}/good", None)
    good = Path(tmp) / "good" / "last.ckpt"
    out = {}
    for file in sorted(p.name for p in good.iterdir()):
        case = Path(tmp) / f"swap_{file}"
        shutil.copytree(good, case / "last.ckpt")
        marker = Path(tmp) / f"marker_{file}"
        payload = _Marker(str(marker))
        if file == "meta.pt":
            torch.save({"loops": payload}, case / "last.ckpt" / file)  # a valid torch file, a hostile object
        else:
            (case / "last.ckpt" / file).write_bytes(pickle.dumps(payload))
        try:
            _fit("tp1", world, TOTAL, None, str(case / "last.ckpt"))
            out[file] = ("loaded", marker.exists())
        except Exception as err:  # noqa: BLE001 - the test inspects what was raised
            out[file] = (f"{type(err).__name__}: {err}", marker.exists())
    return out


def test_crafted_checkpoint_files_are_refused_and_run_nothing(tmp_path):
    results = run_distributed(_resume_each_swapped, 1, str(tmp_path), init_process_group=False)[0]
    assert set(results) >= {".metadata", "meta.pt", "__0_0.distcp"}
    for file, (outcome, marker) in results.items():
        assert not marker, f"loading a crafted {file} ran code"
        assert outcome != "loaded", f"a crafted {file} was loaded"
    assert "UnsafeCheckpointError" in results[".metadata"][0]
    assert "UnsafeCheckpointError" in results["meta.pt"][0]


# ---- asynchronous saves -----------------------------------------------------------------------------
class _WriteGate:
    """Holds each background shard write until the next training step has started (or training ended).

    So a save cannot finish before training moves on: if ``async_save`` blocked the training thread, the
    write would wait here for a step that never starts, and the test fails (the gate's 60 s timeout).
    """

    def __init__(self) -> None:
        import threading

        self.cond = threading.Condition()
        self.batch_starts = 0
        self.ended = False
        self.writes = 0
        self.overlapped: list[bool] = []  # per write: the next step started while it was held
        self.threads: list[str] = []

    def install(self) -> None:
        import threading

        from torch.distributed.checkpoint import FileSystemWriter

        original = FileSystemWriter.write_data
        gate = self

        def write_data(self, plan, planner):
            with gate.cond:
                gate.writes += 1
                n = gate.writes  # the n-th save is started at the end of step n (every_n_train_steps=1)
                gate.threads.append(threading.current_thread().name)
                ok = gate.cond.wait_for(lambda: gate.batch_starts > n or gate.ended, timeout=60)
                gate.overlapped.append(ok and gate.batch_starts > n)
            return original(self, plan, planner)

        FileSystemWriter.write_data = write_data


class _InFlightProbe(L.Callback):
    """At each step's start: is the previous save still being written, and what does the directory hold?"""

    def __init__(self, gate: _WriteGate, ckpt: object, ckpt_dir: str) -> None:
        self.gate, self.ckpt, self.dir = gate, ckpt, Path(ckpt_dir)
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from lightning_par.checkpoint.safe import read_meta

        saver = self.ckpt.saver
        partial = saver.pending_path
        last = self.dir / "last.ckpt"
        self.seen.append(
            {
                "step": trainer.global_step,
                "in_flight": saver.in_flight,
                "partial_has_shards": partial is not None and any(partial.glob("*.distcp")),
                "last_step": read_meta(last)["global_step"] if last.exists() else None,
            }
        )
        with self.gate.cond:  # this step has started: release the write
            self.gate.batch_starts += 1
            self.gate.cond.notify_all()

    def on_train_end(self, trainer, pl_module) -> None:  # runs before the checkpoint callbacks' on_train_end
        with self.gate.cond:
            self.gate.ended = True
            self.gate.cond.notify_all()


def _async_runs(rank: int, world: int, tmp: str) -> dict:
    from lightning_par.callbacks import ShardedCheckpoint

    kw, _ = LAYOUTS["tp2"]
    data = FixedBatches(GLOBAL_BATCH * SAVE_AT, TINY["block_size"], TINY["vocab_size"], ignore_some=True)
    out: dict = {"straight": _fit("tp2", world, TOTAL, None, None)}
    for mode in ("sync", "async"):
        gate = _WriteGate()
        if mode == "async":
            gate.install()
        ckpt = ShardedCheckpoint(
            async_save=mode == "async",
            dirpath=f"{tmp}/{mode}",
            save_last=True,
            every_n_train_steps=1,
            save_top_k=0,
        )
        callbacks: list = [ckpt]
        if mode == "async":
            probe = _InFlightProbe(gate, ckpt, f"{tmp}/{mode}")
            callbacks.append(probe)
        L.seed_everything(SEED, verbose=False)
        trainer = quiet_trainer(
            lightning_par.HybridParallelStrategy(**kw),
            world,
            max_steps=SAVE_AT,
            gradient_clip_val=0.05,
            callbacks=callbacks,
            enable_checkpointing=True,
        )
        trainer.fit(GPT(**MODEL, **OPTIM), DataLoader(data, batch_size=GLOBAL_BATCH))
        if mode == "async":
            out["seen"], out["overlapped"], out["threads"] = probe.seen, gate.overlapped, gate.threads
            out["left_pending"] = ckpt.saver.pending_path
    out["resumed"] = _fit("tp2", world, TOTAL, None, f"{tmp}/async/last.ckpt")
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, in this (non-distributed) process, through the safe reader."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_par.checkpoint.safe import SafeFileSystemReader
    from lightning_par.checkpoint.sharded import _dcp_load

    reader = SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    request = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in saved.items()
        if isinstance(m, TensorStorageMetadata)
    }
    _dcp_load(request, reader, path, no_dist=True)
    return request


def test_async_save_overlaps_training_and_equals_a_synchronous_save(tmp_path):
    from lightning_par.checkpoint.safe import read_meta

    r = run_distributed(_async_runs, 2, str(tmp_path), init_process_group=False, timeout=280)
    for rank in (0, 1):
        out = r[rank]
        # Saves after steps 1, 2, 3 were still being written when the next step began (the gate held
        # them until then), from DCP's background thread; the one after the last step was finished at
        # the end of fit, which left nothing pending.
        assert out["overlapped"] == [True, True, True, False], out["overlapped"]
        assert all(t.startswith("AsyncCheckpointExecutor") for t in out["threads"]), out["threads"]
        assert out["left_pending"] is None
        # What a step saw of the save before it: still in flight, no shard file in the partial directory
        # yet, and "last" is the previous complete checkpoint (none before the second save completed).
        seen = out["seen"]
        assert [s["step"] for s in seen] == [0, 1, 2, 3]
        assert [s["in_flight"] for s in seen] == [False, True, True, True]
        assert [s["partial_has_shards"] for s in seen] == [False, False, False, False]
        assert [s["last_step"] for s in seen] == [None, None, 1, 2]
    # The result: the same tensors, bit for bit, and the same loop/scheduler/optimizer state as a
    # synchronous save at the same step.
    sync, async_ = tmp_path / "sync" / "last.ckpt", tmp_path / "async" / "last.ckpt"
    a, b = _read_tensors(sync), _read_tensors(async_)
    assert a.keys() == b.keys() and len(a) > 20
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for file in sorted(p.name for p in sync.glob("*.distcp")):
        assert (sync / file).read_bytes() == (async_ / file).read_bytes(), file
    meta_a, meta_b = read_meta(sync), read_meta(async_)
    assert meta_a["global_step"] == meta_b["global_step"] == SAVE_AT
    for key in meta_a.keys() - {"callbacks"}:  # the callbacks' state names the two directories
        assert meta_a[key] == meta_b[key], key
    assert not list(tmp_path.rglob(".last.ckpt.partial-*"))
    # Resuming from the asynchronous save continues bitwise as the uninterrupted run.
    assert r[0]["resumed"] == r[0]["straight"][SAVE_AT:]
