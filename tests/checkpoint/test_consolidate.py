"""``lightning-par consolidate``: one ordinary Lightning checkpoint from sharded ones of tp=2, pp=2 and ep=2.

Each layout trains 4 steps on 2 processes and saves after steps 2 and 4 (16 rows, a global batch of 8: a
save at the end of each epoch). The reference is the same training in one process with plain Lightning
(``Trainer(strategy="auto")``) from the same initial weights, whose own checkpoint shows the format a
consolidated one must have. The vocabulary (251, padded to a multiple of 1) is padded to 252 by tp=2 and
not at all by one process, so the tp=2 checkpoint must be cut; pp=2 cuts the model in the middle of layer
1 and keeps the tied head as a copy on its last stage; ep=2 spreads a MoE layer's experts over the ranks.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_par.models import GPT
from torch.utils.data import DataLoader, DistributedSampler

import lightning_par
from lightning_par.checkpoint.consolidate import consolidate
from lightning_par.cli import main
from tests.harness import run_distributed
from tests.parity import OPTIM, SEED, TINY, FixedBatches, full, quiet_trainer

DENSE = {**TINY, "vocab_size": 251, "pad_vocab_size_multiple": 1}
MOE = {**DENSE, "num_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2}  # layer 1: 4 experts, 2 per ep rank
BATCH, STEPS, SAVE_AT, CLIP = 8, 4, 2, 0.05
IDS = torch.arange(2 * 16).reshape(2, 16) % DENSE["vocab_size"]
# The parity bar of the layout tests: fp32 round-off (weights: 1e-5 absolute, 1% of one Adam step).
RTOL, ATOL = 1e-5, 1e-5
LAYOUTS = {
    "tp2": (lambda: lightning_par.HybridParallelStrategy(tensor_parallel_size=2), DENSE, 1),
    "pp2": (
        lambda: lightning_par.HybridParallelStrategy(
            tensor_parallel_size=1, pipeline_parallel_size=2, num_microbatches=2
        ),
        DENSE,
        1,
    ),
    "ep2": (lambda: lightning_par.ExpertParallelStrategy(expert_parallel_size=2), MOE, 2),
}


def _data() -> FixedBatches:
    return FixedBatches(2 * BATCH, DENSE["block_size"], DENSE["vocab_size"], ignore_some=True)


def _parallel_runs(rank: int, world: int, tmp: str) -> dict:
    """Every layout: 4 steps saving after 2 and 4; the final logits (whole vocabulary) and parameters."""
    from lightning_par.callbacks import ShardedCheckpoint
    from lightning_par.models.gpt import gather_vocab

    out = {}
    for name, (strategy, model_kw, dp) in LAYOUTS.items():
        L.seed_everything(SEED, verbose=False)
        ckpt = ShardedCheckpoint(
            dirpath=f"{tmp}/{name}", filename="{step}", every_n_train_steps=SAVE_AT, save_top_k=-1
        )
        trainer = quiet_trainer(
            strategy(),
            world,
            max_steps=STEPS,
            gradient_clip_val=CLIP,
            callbacks=[ckpt],
            enable_checkpointing=True,
        )
        model = GPT(**model_kw, **OPTIM)
        trainer.fit(model, DataLoader(_data(), batch_size=BATCH // dp))
        with torch.no_grad():
            logits = model(IDS)
        if name == "tp2":  # this rank's slice of the (padded) vocabulary: gather it
            logits = gather_vocab(logits, model.model.head.tp)
        out[name] = {"logits": logits, "params": {n: full(p) for n, p in model.named_parameters()}}
    return out


def _merged_params(results: list[dict], name: str) -> dict[str, torch.Tensor]:
    """One run's parameters from every rank (pipeline stages, experts); the tied head copy checked, dropped."""
    union: dict[str, torch.Tensor] = {}
    for r in results:
        union.update(r[name]["params"])
    head = union.pop("model.head.weight", None)
    if head is not None:  # pp: the last stage's copy of the tied embedding takes the same steps
        assert torch.equal(head, union["model.embed.wte.weight"]), name
    return union


def _loader() -> DataLoader:
    """The order Lightning's distributed sampler gives the parallel runs (shuffled, seeded, per epoch)."""
    data = _data()
    return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, 1, 0, True, SEED))


def _one_process(model: GPT, steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = quiet_trainer("auto", 1, max_steps=steps, gradient_clip_val=CLIP)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer


def _assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """rtol 1e-5 relative to the tensor's own scale (Adam's moments of near-zero gradients cancel)."""
    torch.testing.assert_close(
        got, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def _shared(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names whose tensors share storage (tied weights), as a torch.load'ed checkpoint shows them."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in state.items():
        by_ptr.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    return sorted(sorted(v) for v in by_ptr.values() if len(v) > 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """The sharded checkpoints of every layout, what the parallel runs saw, and the one-process reference."""
    tmp = tmp_path_factory.mktemp("consolidate")
    results = run_distributed(_parallel_runs, 2, str(tmp), init_process_group=False, timeout=280)
    refs = {}
    for kind, model_kw in (("dense", DENSE), ("moe", MOE)):
        L.seed_everything(SEED, verbose=False)
        model = GPT(**model_kw, **OPTIM)
        trainer = _one_process(model, STEPS)
        trainer.save_checkpoint(tmp / f"ref_{kind}.ckpt")
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        refs[kind] = (params, torch.load(tmp / f"ref_{kind}.ckpt", weights_only=True))
    return tmp, results, refs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_consolidated_file_loads_resumes_and_is_one_process_lightning_s(runs, name, tmp_path):
    tmp, results, refs = runs
    model_kw = LAYOUTS[name][1]
    ref_params, ref_ckpt = refs["moe" if model_kw is MOE else "dense"]
    out4, out2 = tmp_path / "step4.ckpt", tmp_path / "step2.ckpt"
    assert consolidate(tmp / name / "step=4.ckpt", out4, module=GPT) == out4
    consolidate(tmp / name / "step=2.ckpt", out2, module="lightning_par.models.GPT")

    # (a) load_from_checkpoint gives the parallel run's logits, over the real (unpadded) vocabulary.
    loaded = GPT.load_from_checkpoint(out4).eval()
    with torch.no_grad():
        logits = loaded(IDS)
    assert logits.shape[-1] == DENSE["vocab_size"]  # one process's padding (none), not tp=2's
    parallel_logits = results[0][name]["logits"]
    assert parallel_logits.shape[-1] == (252 if name == "tp2" else 251)
    torch.testing.assert_close(logits, parallel_logits[..., : DENSE["vocab_size"]], rtol=RTOL, atol=ATOL)

    # The file is what one process's Lightning writes: names, shapes, tied storage, optimizer format.
    got = torch.load(out4, weights_only=True)
    # (Saved during the second epoch; the reference after fit ended it, so only the step counts compare.)
    assert got["epoch"] == 1 and got["global_step"] == ref_ckpt["global_step"] == STEPS
    assert got["state_dict"].keys() == ref_ckpt["state_dict"].keys()
    tied = [["model.embed.wte.weight", "model.head.weight"]]
    assert _shared(got["state_dict"]) == _shared(ref_ckpt["state_dict"]) == tied
    for key, ref in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(
            got["state_dict"][key], ref, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    wte = got["state_dict"]["model.embed.wte.weight"]  # cut from tp=2's 252 rows, without the 252nd's storage
    assert wte.untyped_storage().nbytes() == wte.numel() * wte.element_size() == 251 * 32 * 4
    assert got["lr_schedulers"] == ref_ckpt["lr_schedulers"]
    (opt,), (ref_opt,) = got["optimizer_states"], ref_ckpt["optimizer_states"]
    assert (
        opt["param_groups"] == ref_opt["param_groups"]
    )  # hyper-parameters, ids in configure_optimizers' order
    assert opt["state"].keys() == ref_opt["state"].keys()
    for pid, fields in ref_opt["state"].items():
        assert opt["state"][pid].keys() == fields.keys(), pid
        for field, ref in fields.items():
            if field == "step":
                assert torch.equal(opt["state"][pid][field], ref), pid
            else:
                _assert_close_to_scale(opt["state"][pid][field], ref, f"state {pid} {field}")
    assert "combined_loader" not in got["loops"]["fit_loop"]["state_dict"]  # the strategy's loader position
    assert got["lightning_par_consolidated_from"]["parallel_layout"]["world_size"] == 2

    # (b) plain Lightning resumes the step-2 file for 2 steps and ends with the parallel run's step-4
    # weights and the one-process run's (Adam's moments, the LR schedule and the step count came through).
    L.seed_everything(SEED, verbose=False)
    resumed = GPT(**model_kw, **OPTIM)
    trainer = _one_process(resumed, STEPS, ckpt_path=out2)
    assert trainer.global_step == STEPS
    parallel = _merged_params(results, name)
    assert parallel.keys() == ref_params.keys() == dict(resumed.named_parameters()).keys()
    for key, p in resumed.named_parameters():
        par = parallel[key]
        if par.shape != p.shape:  # tp=2's padded vocabulary row, never trained
            assert (name, key, par.shape[0]) == ("tp2", "model.embed.wte.weight", 252)
            assert not par[251:].any()
            par = par[:251]
        for ref, what in ((par, "the parallel run"), (ref_params[key], "one process")):
            torch.testing.assert_close(
                p.detach(), ref, rtol=RTOL, atol=ATOL, msg=lambda m, k=key, w=what: f"{k} vs {w}: {m}"
            )


def test_without_optimizer_state_weights_load_and_fit_refuses_to_resume(runs, tmp_path):
    tmp, _, _ = runs
    weights, whole = tmp_path / "weights.ckpt", tmp_path / "whole.ckpt"
    ckpt = str(tmp / "tp2" / "step=4.ckpt")
    main(["consolidate", ckpt, str(weights), "--no-optimizer", "--model", "lightning_par.models.GPT"])
    main(["consolidate", ckpt, str(whole), "--model", "lightning_par.models.GPT"])
    light, heavy = torch.load(weights, weights_only=True), torch.load(whole, weights_only=True)
    # What Lightning's save_weights_only=True leaves out, and nothing else.
    assert heavy.keys() - light.keys() == {"optimizer_states", "lr_schedulers", "callbacks"}
    assert light["state_dict"].keys() == heavy["state_dict"].keys()
    assert all(torch.equal(light["state_dict"][k], v) for k, v in heavy["state_dict"].items())
    with torch.no_grad():
        a = GPT.load_from_checkpoint(weights).eval()(IDS)
        b = GPT.load_from_checkpoint(whole).eval()(IDS)
    assert torch.equal(a, b)
    L.seed_everything(SEED, verbose=False)
    with pytest.raises(KeyError, match="contains only the model"):
        _one_process(GPT(**DENSE, **OPTIM), STEPS, ckpt_path=weights)


def test_refusals_name_the_problem_and_write_nothing(runs, tmp_path, capsys):
    tmp, _, _ = runs
    ckpt = tmp / "pp2" / "step=4.ckpt"
    model = ["--model", "lightning_par.models.GPT"]

    def refused(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["consolidate", *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    existing = tmp_path / "existing.ckpt"
    existing.write_bytes(b"keep me")
    assert f"out_file='{existing}' exists; nothing was overwritten" in refused(
        [str(ckpt), str(existing), *model]
    )
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(FileExistsError, match="out_file=.* exists"):
        consolidate(ckpt, existing, module=GPT)
    assert existing.read_bytes() == b"keep me"

    new = tmp_path / "new.ckpt"
    for not_a_checkpoint in (tmp_path, tmp_path / "missing"):
        err = refused([str(not_a_checkpoint), str(new), *model])
        assert f"checkpoint_dir='{not_a_checkpoint}' is not a sharded checkpoint of lightning-par" in err
    assert "is a file, not a sharded checkpoint directory" in refused([str(existing), str(new), *model])
    assert "module='no_such_package.Model' cannot be imported" in refused(
        [str(ckpt), str(new), "--model", "no_such_package.Model"]
    )
    # A plain (not LightningCLI) run does not record its class.
    assert "does not name its LightningModule class" in refused([str(ckpt), str(new)])

    # What LightningCLI records: the class, used only if already imported (a checkpoint makes nothing
    # import), built by LightningCLI's instantiator (any other is refused, as load_from_checkpoint does).
    def recorded(class_path: str, instantiator: str = "lightning.pytorch.cli.instantiate_module") -> Path:
        copy = tmp_path / f"{class_path}-{instantiator}".replace(".", "_")
        shutil.copytree(ckpt, copy)
        meta = torch.load(copy / "meta.pt", weights_only=True)
        meta["hyper_parameters"] = {
            "_class_path": class_path,
            **meta["hyper_parameters"],
            "_instantiator": instantiator,
        }
        torch.save(meta, copy / "meta.pt")
        return copy

    err = refused([str(recorded("not_imported_pkg.Model")), str(new)])
    assert "class 'not_imported_pkg.Model' is not imported" in err
    assert "not_imported_pkg" not in sys.modules
    assert "must be a LightningModule class" in refused([str(recorded("os.system")), str(new)])
    err = refused([str(recorded("lightning_par.models.GPT", "os.system")), str(new)])
    assert "the instantiator 'os.system'; only LightningCLI's" in err
    with pytest.raises(TypeError, match="optimizer='no' is not valid: it must be True or False"):
        consolidate(ckpt, new, optimizer="no", module=GPT)
    assert not new.exists()
    assert not list(tmp_path.glob(".*.partial-*"))

    main(["consolidate", str(recorded("lightning_par.models.GPT")), str(new)])
    assert capsys.readouterr().out.strip() == f"wrote {new}"
    by_class_path = torch.load(new, weights_only=True)["state_dict"]
    consolidate(ckpt, tmp_path / "by_module.ckpt", module=GPT)
    by_module = torch.load(tmp_path / "by_module.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(by_class_path[k], v) for k, v in by_module.items())


def test_padding_is_cut_only_where_it_is_zero():
    from lightning_par.checkpoint.consolidate import _fit

    target = torch.empty(251, 4, device="meta")
    padded = torch.cat([torch.randn(251, 4), torch.zeros(1, 4)])
    cut = _fit(padded, target, "model.embed.wte.weight", GPT)
    assert torch.equal(cut, padded[:251]) and cut.untyped_storage().nbytes() == 251 * 4 * 4
    padded[251, 2] = 1e-3  # a trained row is not padding
    with pytest.raises(
        ValueError, match=r"model.embed.wte.weight is \(252, 4\) .* beyond \(251, 4\) is not zero"
    ):
        _fit(padded, target, "model.embed.wte.weight", GPT)
    with pytest.raises(
        ValueError, match=r"is \(250, 4\) in the checkpoint but \(251, 4\) in a one-process GPT"
    ):
        _fit(torch.zeros(250, 4), target, "model.embed.wte.weight", GPT)
