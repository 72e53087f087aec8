"""BERT (masked LM and classification): Hugging Face parity, layout parity, metrics, export, bad input.

Two spawned process groups carry every multi-process check (process start is the slow part on 2 cores):
2 processes (tp=2 and pp=2) and 4 processes (tp2 x pp2 and dp2 x tp2).

Tolerances: against Hugging Face, both sides compute in float32 on the same weights with different
kernels (separate vs fused q/k/v, additive vs boolean mask in SDPA, vocabulary-parallel softmax), so
sums differ in order; that is ~1e-6 on unit-scale logits, and 1e-5 is far below what any wrong layout,
mask or bias gives. Layout parity uses the project's RTOL 1e-5 / ATOL 1e-6 on losses and gradients after
several AdamW steps (fp32 round-off of all-reduced partial sums), as the GPT parity tests do.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import pytest
import torch
from lightning_par.models import BERT, BERTClassifier
from lightning_par.models.base import warmup_cosine
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import lightning_par
from tests.harness import run_distributed
from tests.parity import Recorder, assert_same_run, full, quiet_trainer

HF_VOCAB, HF_LABELS, SEQ = 1001, 3, 16  # 1001: not a multiple of 64 or of tp (padded vocabulary)
HF_TOL = {"rtol": 1e-5, "atol": 1e-5}  # see the module docstring
RTOL, ATOL = 1e-5, 1e-6  # layout parity: fp32 round-off of all-reduced sums
TINY = dict(vocab_size=250, n_layer=2, n_head=4, n_embd=32, max_position_embeddings=SEQ, dropout=0.0)
OPTIM = dict(learning_rate=1e-3, warmup_steps=1, lr_decay_steps=10, weight_decay=0.1)
SEED, STEPS, BATCH = 1234, 3, 8


# ---- data ---------------------------------------------------------------------------------------------
def _rows(n: int, vocab: int, task: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """HF-style rows with padding (real lengths 10..16), two segments, and masked-LM or class labels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = SEQ - 2 * (i % 4)
        ids = torch.randint(1, vocab, (SEQ,), generator=g)
        ids[length:] = 0
        mask = (torch.arange(SEQ) < length).long()
        types = ((torch.arange(SEQ) >= length // 2) & mask.bool()).long()
        if task == "mlm":
            labels = torch.full((SEQ,), -100)
            picked = torch.randperm(length, generator=g)[: 2 + i % 3]  # 2-4 counted tokens per row
            labels[picked] = ids[picked]
            ids[picked[0]] = vocab - 1  # a [MASK] stand-in
        else:
            labels = torch.tensor(i % HF_LABELS)
        rows.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels})
    return rows


class Rows(Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---- tiny Hugging Face checkpoints ----------------------------------------------------------------------
def _hf_config(**kw: Any) -> BertConfig:
    base = dict(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**base, **kw})


@torch.no_grad()
def _save_tiny(path: Any, task: str) -> torch.nn.Module:
    """A random HF model (biases and LayerNorms random too, so a swapped tensor shows) saved to ``path``."""
    torch.manual_seed(0)
    if task == "mlm":
        hf = BertForMaskedLM(_hf_config())
    else:
        hf = BertForSequenceClassification(_hf_config(id2label={i: str(i) for i in range(HF_LABELS)}))
    gen = torch.Generator().manual_seed(1)
    for name, p in hf.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name else 0.1 * noise)
    hf.eval().save_pretrained(path)
    return hf


def _hf_out(hf: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return hf(**batch)


# ---- training runs: strategy vs a plain PyTorch reference ----------------------------------------------
def _model(task: str, n_layer: int = TINY["n_layer"]) -> L.LightningModule:
    kw = {**TINY, **OPTIM, "n_layer": n_layer}
    return BERT(**kw) if task == "mlm" else BERTClassifier(num_labels=HF_LABELS, **kw)


class TokenMeanRecorder(Recorder):
    """Records the loss as the mean over every counted token of the global batch (replicas' rows hold
    different numbers of masked tokens, so the mean of the replicas' means would differ from it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = outputs["num_tokens"].float()
        # tp and pp peers hold the same (loss, count): they weigh every replica alike.
        stats = trainer.strategy.reduce(torch.stack([outputs["loss"].detach() * n, n]), reduce_op="sum")
        self.losses[-1] = float(stats[0] / stats[1])


def _fit(strategy: Any, devices: int, task: str, batch: int, data: Dataset, n_layer: int = 2) -> dict:
    L.seed_everything(SEED, verbose=False)
    model = _model(task, n_layer)
    rec = TokenMeanRecorder()
    trainer = quiet_trainer(
        strategy, devices, max_steps=STEPS, gradient_clip_val=0.05, limit_val_batches=0, callbacks=[rec]
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=batch))
    params = {n: full(p) for n, p in model.named_parameters()}
    return {
        "losses": rec.losses,
        "grads": rec.grads,
        "clipped": rec.clipped,
        "norms": rec.norms,
        "params": params,
    }


def _merge(results: list[dict]) -> dict:
    """Every rank's records as one process has them; the decoder tied to the word embedding (a separate
    copy on the last pipeline stage) must equal it and is then dropped."""
    tied, embed = "model.head.decoder.weight", "model.embed.wte.weight"

    def union(dicts: list[dict]) -> dict:
        out: dict = {}
        for d in dicts:
            out.update(d)
        if tied in out and embed in out:
            assert torch.equal(out[tied], out[embed]), "the tied decoder and word embedding differ"
            del out[tied]
        return out

    merged = {k: results[0][k] for k in ("losses", "norms")}
    for key in ("grads", "clipped"):
        merged[key] = [union([r[key][s] for r in results]) for s in range(len(results[0][key]))]
    merged["params"] = union([r["params"] for r in results])
    return merged


def _reference(task: str, batch: int, data: Dataset, n_layer: int = 2) -> dict:
    """The same training in one process, plain PyTorch (torch's clipping and AdamW)."""
    L.seed_everything(SEED, verbose=False)
    model = _model(task, n_layer)
    model.configure_model()
    opt = torch.optim.AdamW(model._param_groups(), lr=OPTIM["learning_rate"], betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(1, 10, 0.1))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=SEED)  # Lightning's order
    out: dict[str, Any] = {"losses": [], "grads": [], "clipped": [], "norms": []}
    for step, b in enumerate(DataLoader(data, batch_size=batch, sampler=sampler)):
        if step == STEPS:
            break
        opt.zero_grad()
        loss_sum, n = model._loss(b)
        (loss_sum / n).backward()
        out["losses"].append(float(loss_sum.detach() / n))
        out["grads"].append({k: p.grad.clone() for k, p in model.named_parameters()})
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        out["clipped"].append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        sched.step()
    out["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out


# ---- Hugging Face checkpoints under a layout: validate (loss, metrics) and predict (logits) -------------
def _hf_eval(strategy: Any, devices: int, cls: type, path: str, rows: list, batch: int) -> dict:
    model = cls.from_hf(path)
    trainer = quiet_trainer(strategy, devices)
    metrics = trainer.validate(model, DataLoader(Rows(rows), batch_size=batch), verbose=False)[0]
    inputs = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    preds = trainer.predict(model, DataLoader(Rows(inputs), batch_size=batch))
    mesh = strategy.device_mesh
    return {"metrics": metrics, "logits": torch.cat(preds), "tp_rank": mesh["tp"].get_local_rank()}


def _vocab_logits(results: list[dict], tp: int) -> torch.Tensor:
    """Our MLM logits with the vocabulary slices of the tp ranks put back together, padding dropped."""
    by_tp = {r["tp_rank"]: r["logits"] for r in results}
    return torch.cat([by_tp[t] for t in range(tp)], dim=-1)[..., :HF_VOCAB]


def _two(rank: int, world: int, mlm_dir: str, cls_dir: str, rows: dict, ckpt: str) -> dict:
    out: dict = {"parity": {}}
    layouts = {"tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2, num_microbatches=4)}
    for task in ("mlm", "cls"):
        for name, kw in layouts.items():
            strategy = lightning_par.HybridParallelStrategy(**kw)
            out["parity"][task, name] = _fit(strategy, world, task, BATCH, Rows(rows[f"train_{task}"]))
    # ZBV: two stages per rank in a V (embedding and tied decoder both on rank 0), mask to all 4 stages.
    zbv = lightning_par.HybridParallelStrategy(
        pipeline_parallel_size=2, pipeline_schedule="zbv", num_microbatches=4
    )
    out["parity"]["mlm", "zbv"] = _fit(zbv, world, "mlm", BATCH, Rows(rows["train_mlm"]), n_layer=4)
    tp2 = lightning_par.HybridParallelStrategy(tensor_parallel_size=2)
    out["hf_mlm"] = _hf_eval(tp2, world, BERT, mlm_dir, rows["hf_mlm"], 6)
    tp2 = lightning_par.HybridParallelStrategy(tensor_parallel_size=2)
    out["hf_cls"] = _hf_eval(tp2, world, BERTClassifier, cls_dir, rows["hf_cls"], 6)

    # Export round trip: from_hf, 2 training steps at tp=2, sharded checkpoint (exported by the parent).
    L.seed_everything(SEED, verbose=False)
    model = BERT.from_hf(mlm_dir, learning_rate=1e-2, warmup_steps=0)
    trainer = quiet_trainer(lightning_par.HybridParallelStrategy(tensor_parallel_size=2), world, max_steps=2)
    trainer.fit(model, DataLoader(Rows(rows["hf_mlm"]), batch_size=3))
    trainer.save_checkpoint(ckpt)
    inputs = [{k: v for k, v in r.items() if k != "labels"} for r in rows["hf_mlm"]]
    out["trained"] = torch.cat(trainer.predict(model, DataLoader(Rows(inputs), batch_size=6)))
    return out


def _four(rank: int, world: int, mlm_dir: str, cls_dir: str, rows: dict) -> dict:
    tp2pp2 = dict(tensor_parallel_size=2, pipeline_parallel_size=2)
    out = {
        "hf_mlm": _hf_eval(
            lightning_par.HybridParallelStrategy(**tp2pp2), world, BERT, mlm_dir, rows["hf_mlm"], 6
        ),
        "hf_cls": _hf_eval(
            lightning_par.HybridParallelStrategy(**tp2pp2), world, BERTClassifier, cls_dir, rows["hf_cls"], 6
        ),
    }
    dp2tp2 = dict(data_parallel_size=2, tensor_parallel_size=2)
    # Metrics over the whole validation set, each dp replica seeing half of it.
    for task, cls, path in (("mlm", BERT, mlm_dir), ("cls", BERTClassifier, cls_dir)):
        model = cls.from_hf(path)
        trainer = quiet_trainer(lightning_par.HybridParallelStrategy(**dp2tp2), world)
        loader = DataLoader(Rows(rows[f"metrics_{task}"]), batch_size=4)
        out[f"metrics_{task}"] = trainer.validate(model, loader, verbose=False)[0]
        # Reduced over data parallel only: one item added on every rank sums to dp = 2, not to world = 4
        # (ratios like accuracy would not show a reduction over tp peers too; a count does).
        probes = [(model.val_loss, torch.tensor(1.0), torch.tensor(1), lambda m: m.num_tokens)]
        if task == "cls":
            probes.append(
                (model.val_f1, torch.tensor([0]), torch.tensor([1]), lambda m: m.tp.sum() + m.fn.sum())
            )
        for metric, a, b, count in probes:
            metric.update(a, b)
            metric.sync()
            out.setdefault("probes", []).append(int(count(metric)))
            metric.unsync()
            metric.reset()
    out["parity"] = _fit(
        lightning_par.HybridParallelStrategy(**dp2tp2), world, "mlm", BATCH // 2, Rows(rows["train_mlm"])
    )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bert")
    mlm_dir, cls_dir = tmp / "mlm", tmp / "cls"
    hf_mlm, hf_cls = _save_tiny(mlm_dir, "mlm"), _save_tiny(cls_dir, "cls")
    rows = {
        "train_mlm": _rows(32, TINY["vocab_size"], "mlm", seed=1),
        "train_cls": _rows(32, TINY["vocab_size"], "cls", seed=2),
        "hf_mlm": _rows(6, HF_VOCAB, "mlm", seed=3),
        "hf_cls": _rows(6, HF_VOCAB, "cls", seed=4),
        "metrics_cls": _rows(16, HF_VOCAB, "cls", seed=5),
    }
    # Masked-LM accuracy must not be trivially 0: on even rows the labels are HF's own predictions.
    metrics_mlm = _rows(16, HF_VOCAB, "mlm", seed=6)
    predicted = _hf_out(hf_mlm, _stack([{k: v for k, v in r.items() if k != "labels"} for r in metrics_mlm]))
    for i, r in enumerate(metrics_mlm[::2]):
        counted = r["labels"] != -100
        r["labels"][counted] = predicted.logits[2 * i].argmax(-1)[counted]
    rows["metrics_mlm"] = metrics_mlm
    return {
        "tmp": tmp,
        "mlm_dir": str(mlm_dir),
        "cls_dir": str(cls_dir),
        "hf_mlm": hf_mlm,
        "hf_cls": hf_cls,
        "rows": rows,
    }


def _check_hf(result: dict, hf_mlm: Any, hf_cls: Any, rows: dict, tp: int, what: str) -> list[float]:
    """Our loss and logits equal HF's on a padded batch; returns the max differences seen."""
    diffs = []
    ref = _hf_out(hf_mlm, _stack(rows["hf_mlm"]))
    assert ref.logits.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert result["hf_mlm"]["metrics"]["val/loss"] == pytest.approx(float(ref.loss), rel=1e-5), what
    logits = _vocab_logits(result["hf_mlm_all"], tp)
    torch.testing.assert_close(logits, ref.logits, **HF_TOL, msg=lambda m: f"{what} MLM logits: {m}")
    diffs.append(float((logits - ref.logits).abs().max()))
    ref = _hf_out(hf_cls, _stack(rows["hf_cls"]))
    assert result["hf_cls"]["metrics"]["val/loss"] == pytest.approx(float(ref.loss), rel=1e-5), what
    torch.testing.assert_close(
        result["hf_cls"]["logits"], ref.logits, **HF_TOL, msg=lambda m: f"{what} cls: {m}"
    )
    diffs.append(float((result["hf_cls"]["logits"] - ref.logits).abs().max()))
    return diffs


def test_bert_two_processes_tp2_pp2_hf_parity_and_export(setup: dict) -> None:
    rows, ckpt = setup["rows"], str(setup["tmp"] / "trained.ckpt")
    results = run_distributed(
        _two, 2, setup["mlm_dir"], setup["cls_dir"], rows, ckpt, init_process_group=False, timeout=280
    )
    for task in ("mlm", "cls"):
        ref = _reference(task, BATCH, Rows(rows[f"train_{task}"]))
        for name in ("tp2", "pp2"):
            got = _merge([r["parity"][task, name] for r in results])
            assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what=f"{task} {name}")
    got = _merge([r["parity"]["mlm", "zbv"] for r in results])
    ref = _reference("mlm", BATCH, Rows(rows["train_mlm"]), n_layer=4)
    assert_same_run(got, ref, RTOL, ATOL, TINY["vocab_size"], what="mlm pp2 zbv")

    r0 = {**results[0], "hf_mlm_all": [r["hf_mlm"] for r in results]}
    print("tp=2 HF max |diff| (mlm, cls):", _check_hf(r0, setup["hf_mlm"], setup["hf_cls"], rows, 2, "tp=2"))

    from lightning_par.checkpoint.hf import export_hf

    out = export_hf(ckpt, setup["tmp"] / "exported")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    reloaded = BertForMaskedLM.from_pretrained(out).eval()
    ref = _hf_out(reloaded, _stack([{k: v for k, v in r.items() if k != "labels"} for r in rows["hf_mlm"]]))
    ours = torch.cat([results[0]["trained"], results[1]["trained"]], dim=-1)[..., :HF_VOCAB]
    before = _hf_out(setup["hf_mlm"], _stack(rows["hf_mlm"])).logits
    assert (ours - before).abs().max() > 1e-2  # the 2 steps changed the model
    torch.testing.assert_close(ref.logits, ours, **HF_TOL)


def test_bert_four_processes_tp2xpp2_hf_dp2xtp2_parity_and_metrics(setup: dict) -> None:
    rows = setup["rows"]
    results = run_distributed(
        _four, 4, setup["mlm_dir"], setup["cls_dir"], rows, init_process_group=False, timeout=280
    )
    r0 = {**results[0], "hf_mlm_all": [r["hf_mlm"] for r in results]}
    print(
        "tp2 x pp2 HF max |diff| (mlm, cls):",
        _check_hf(r0, setup["hf_mlm"], setup["hf_cls"], rows, 2, "tp2xpp2"),
    )
    for r in results:  # every rank (all pipeline stages) holds the logits
        torch.testing.assert_close(r["hf_cls"]["logits"], results[0]["hf_cls"]["logits"], rtol=0, atol=0)

    got = _merge([r["parity"] for r in results])
    assert_same_run(got, _reference("mlm", BATCH, Rows(rows["train_mlm"])), RTOL, ATOL, 0, what="dp2 x tp2")

    # Metrics, reduced over the two replicas, equal those of one process over the whole set (HF's logits).
    batch = _stack(rows["metrics_cls"])
    logits = _hf_out(setup["hf_cls"], {k: v for k, v in batch.items() if k != "labels"}).logits
    acc = multiclass_accuracy(logits.argmax(-1), batch["labels"], HF_LABELS, average="micro")
    f1 = multiclass_f1_score(logits.argmax(-1), batch["labels"], HF_LABELS, average="macro")
    batch = _stack(rows["metrics_mlm"])
    ref = _hf_out(setup["hf_mlm"], batch)
    counted = batch["labels"] != -100
    mlm_acc = (ref.logits.argmax(-1) == batch["labels"])[counted].double().mean()
    assert 0.3 < mlm_acc < 0.8  # half the rows are labelled with HF's own predictions
    for r in results:
        assert r["probes"] == [2, 2, 2], "metrics must be reduced over the data-parallel group only"
        m = r["metrics_cls"]
        # Accuracy and F1 are ratios of the same integer counts: exact up to the float32 division.
        assert m["val/accuracy"] == pytest.approx(float(acc), abs=1e-6)
        assert m["val/f1"] == pytest.approx(float(f1), abs=1e-6)
        m = r["metrics_mlm"]
        assert m["val/accuracy"] == pytest.approx(float(mlm_acc), abs=1e-6)
        assert m["val/loss"] == pytest.approx(float(ref.loss), rel=1e-5)  # fp32 round-off, as above
        assert m["val/ppl"] == pytest.approx(float(torch.exp(ref.loss)), rel=1e-5)
    print(
        f"dp2 x tp2 metrics: cls accuracy {float(acc):.4f}, f1 {float(f1):.4f}, mlm accuracy {float(mlm_acc):.4f}"
    )


# ---- one process ---------------------------------------------------------------------------------------
def test_from_hf_tp1_parity_with_padding(setup: dict, tmp_path) -> None:
    """tp=1: logits and loss equal HF's (masked LM, classification, and regression with num_labels=1)."""
    for task, cls in (("mlm", BERT), ("cls", BERTClassifier)):
        model = cls.from_hf(setup[f"{task}_dir"])
        model.configure_model()
        batch = _stack(setup["rows"][f"hf_{task}"])
        assert batch["attention_mask"].float().mean() < 1  # padding in the batch
        ref = _hf_out(setup[f"hf_{task}"], batch)
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss_sum, count = model._loss(batch)
        logits = logits[..., :HF_VOCAB] if task == "mlm" else logits
        torch.testing.assert_close(logits, ref.logits, **HF_TOL)
        torch.testing.assert_close(loss_sum / count, ref.loss, **HF_TOL)
        print(f"tp=1 {task}: max |logits diff| {float((logits - ref.logits).abs().max()):.2e}")
    # Regression: one output, mean squared error on float targets (HF's problem_type="regression").
    torch.manual_seed(0)
    hf = BertForSequenceClassification(_hf_config(num_labels=1, problem_type="regression")).eval()
    hf.save_pretrained(tmp_path / "reg")
    model = BERTClassifier.from_hf(str(tmp_path / "reg"))
    assert model.config.num_labels == 1
    model.configure_model()
    batch = _stack(setup["rows"]["hf_cls"])
    batch["labels"] = torch.linspace(-1.0, 2.0, len(batch["labels"]))
    ref = _hf_out(hf, batch)
    with torch.no_grad():
        loss_sum, count = model._loss(batch)
    torch.testing.assert_close(loss_sum / count, ref.loss, **HF_TOL)


def test_export_round_trip_after_training_one_process(setup: dict, tmp_path) -> None:
    """from_hf -> 2 AdamW steps -> export -> HF loads it and gives our logits (the classifier)."""
    model = BERTClassifier.from_hf(setup["cls_dir"])
    model.configure_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _stack(setup["rows"]["hf_cls"])
    for _ in range(2):
        opt.zero_grad()
        loss_sum, count = model._loss(batch)
        (loss_sum / count).backward()
        opt.step()
    out = model.export_hf(str(tmp_path / "exported"))
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = model(**inputs)
    assert (ours - _hf_out(setup["hf_cls"], inputs).logits).abs().max() > 1e-2  # training changed it
    torch.testing.assert_close(_hf_out(reloaded, inputs).logits, ours, **HF_TOL)


def test_bad_input_raises_before_work(setup: dict) -> None:
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=rf"num_labels={bad!r} is not valid: it must be an integer >= 1"):
            BERTClassifier(num_labels=bad, **TINY)
    model = BERTClassifier(num_labels=3, **TINY)
    model.configure_model()
    calls = []
    model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = _stack(_rows(4, TINY["vocab_size"], "cls"))
    batch["labels"] = torch.tensor([0, 2, 3, -100])
    with pytest.raises(
        ValueError,
        match=r"labels holds 3, outside the valid range 0\.\.2 or -100 \(ignored\) \(num_labels=3\)",
    ):
        model.training_step(batch, 0)
    batch["labels"] = torch.tensor([0, 2, 1, -100])
    long = {k: torch.cat([v, v], dim=1) if v.ndim == 2 else v for k, v in batch.items()}
    with pytest.raises(
        ValueError, match=r"sequence length 32 exceeds max_position_embeddings=16; valid lengths: 1\.\.16"
    ):
        model.training_step(long, 0)
    batch["input_ids"][0, 0] = TINY["vocab_size"]
    with pytest.raises(
        ValueError, match=r"input_ids holds 250, outside the valid range 0\.\.249 \(vocab_size=250\)"
    ):
        model.validation_step(batch, 0)
    mlm = BERT(**TINY)
    mlm.configure_model()
    mlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = _stack(_rows(2, TINY["vocab_size"], "mlm"))
    batch["labels"][0, 0] = -5
    with pytest.raises(
        ValueError,
        match=r"labels holds -5, outside the valid range 0\.\.249 or -100 \(ignored\) \(vocab_size=250\)",
    ):
        mlm.training_step(batch, 0)
    assert not calls, "the network ran before the bad input was refused"
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=3 does not divide n_head=4; valid .*\[1, 2, 4\]"
    ):
        model.check_layout(3, False)
    with pytest.raises(ValueError, match="sequence_parallel=True is not supported"):
        model.check_layout(2, True)
    config = json.loads((setup["tmp"] / "mlm" / "config.json").read_text())
    (setup["tmp"] / "relu").mkdir(exist_ok=True)
    (setup["tmp"] / "relu" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"hidden_act='relu' .* is not supported .*valid: \['gelu'\]"):
        BERT.from_hf(str(setup["tmp"] / "relu"))
