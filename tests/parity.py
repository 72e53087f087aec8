"""Shared pieces of the layout-parity tests: tiny models, fixed batches, and an independent reference.

The reference is a plain PyTorch loop on one process (no Lightning, no strategy): torch's own
``clip_grad_norm_`` and AdamW on the unsharded model with the same seed. Parallel runs go through
``lightning.Trainer`` with the strategy under test and must reproduce it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning_par.models import GPT
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

TINY = dict(vocab_size=250, n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)
SEED = 1234
OPTIM = dict(learning_rate=1e-3, warmup_steps=1, lr_decay_steps=10, weight_decay=0.1)


class FixedBatches(Dataset):
    """``n`` random sequences; row ``i`` is the same in every process."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0, ignore_some: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=g)
        self.labels = self.ids.clone()
        if ignore_some:
            self.labels[:, :2] = -100  # the same number of ignored tokens per row

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class Recorder(L.Callback):
    """Records, per optimizer step: loss, reduced gradients, clipped gradients, and the final weights."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.clipped: list[dict[str, torch.Tensor]] = []
        self.norms: list[float] = []
        self.moe: list[dict[str, float]] = []  # the MoE statistics the model logged, per step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))
        self.clipped.append({n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})
        norm = getattr(trainer.strategy, "last_grad_norm", None)
        if norm is not None:
            self.norms.append(float(norm))
        self.moe.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("moe/")})


def quiet_trainer(strategy: Any, devices: int, **kw: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (unless ``kw`` says)."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **{**quiet, **kw})


def trainer_run(
    strategy: Any,
    devices: int,
    steps: int,
    batch_size: int,
    clip: float | None,
    data: Dataset,
    model_kw: dict | None = None,
    model_cls: type = GPT,
    base_kw: dict | None = None,
) -> dict:
    """Train ``model_cls(**base_kw, **model_kw)`` (default ``GPT(**TINY)``) for ``steps`` with ``strategy``;
    return what this rank saw (full tensors).

    Under pipeline parallel a rank sees only its stages' parameters: merge ranks with :func:`merge_ranks`.
    """
    L.seed_everything(SEED, verbose=False)
    model = model_cls(**{**(TINY if base_kw is None else base_kw), **(model_kw or {})}, **OPTIM)
    rec = Recorder()
    trainer = quiet_trainer(
        strategy,
        devices,
        max_steps=steps,
        gradient_clip_val=clip,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[rec],
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=batch_size, shuffle=False))
    params = {n: full(p) for n, p in model.named_parameters()}
    return {
        "losses": rec.losses,
        "grads": rec.grads,
        "clipped": rec.clipped,
        "norms": rec.norms,
        "params": params,
        "moe": rec.moe,
        "tied": model.config.tie_embeddings,
    }


def merge_ranks(results: list[dict]) -> dict:
    """One run's records from every rank, as one process would have them.

    Pipeline ranks hold different parameters; tp and dp peers hold the same full tensors. The head tied
    to the embedding is a separate copy on the last stage: it must equal the embedding (gradients after
    the tie's sum, weights after every step) and is then dropped, as one process has a single tensor.
    """
    merged = {k: results[0][k] for k in ("losses", "norms", "moe") if k in results[0]}
    tied = results[0].get("tied", True)
    for key in ("grads", "clipped"):
        steps = []
        for step in range(len(results[0][key])):
            union: dict[str, torch.Tensor] = {}
            for r in results:
                union.update(r[key][step])
            steps.append(_untie(union, f"{key} step {step}") if tied else union)
        merged[key] = steps
    union = {}
    for r in results:
        union.update(r["params"])
    merged["params"] = _untie(union, "weights") if tied else union
    return merged


def _untie(named: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    head, embed = named.get("model.head.weight"), named.get("model.embed.wte.weight")
    if head is not None and embed is not None:
        assert torch.equal(head, embed), f"{what}: the tied head and embedding differ"
        named = {k: v for k, v in named.items() if k != "model.head.weight"}
    return named


def reference_run(
    steps: int,
    batch_size: int,
    clip: float | None,
    data: Dataset,
    model_kw: dict | None = None,
    model_cls: type = GPT,
    base_kw: dict | None = None,
) -> dict:
    """The same training in one process with plain PyTorch (the independent reference)."""
    L.seed_everything(SEED, verbose=False)
    model = model_cls(**{**(TINY if base_kw is None else base_kw), **(model_kw or {})}, **OPTIM)
    model.configure_model()
    opt = torch.optim.AdamW(model._param_groups(), lr=OPTIM["learning_rate"], betas=(0.9, 0.95))
    from lightning_par.models.base import warmup_cosine

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(OPTIM["warmup_steps"], OPTIM["lr_decay_steps"], 0.1)
    )
    # Lightning always gives the training loader a shuffling DistributedSampler (seeded with the global
    # seed, epoch 0); its
    # permutation does not depend on the number of replicas, so one replica over the global batch size
    # sees exactly the union of what the data-parallel ranks see, step by step.
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=SEED)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    out: dict[str, Any] = {"losses": [], "grads": [], "clipped": [], "norms": [], "moe": []}
    for step, batch in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        loss_sum, n = model._loss(batch)
        loss = loss_sum / n
        loss.backward()
        out["losses"].append(float(loss))
        # MoE routing statistics of the step, per layer: [per-expert load, kept, assigned, ...].
        out["moe"].append({i: m.pop_stats() for i, m in model.model.moe_modules().items()})
        out["grads"].append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        if clip is not None:
            out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        out["clipped"].append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
        sched.step()
    out["params"] = {k: p.detach().clone() for k, p in model.named_parameters()}
    return out


def save_tiny_gpt2(path: Any) -> Any:
    """A small random ``GPT2LMHeadModel`` (vocabulary 1001, which tp does not divide) saved to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=1001,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms too, so a transposed or swapped tensor shows up
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(path)
    return hf


def assert_same_run(
    got: dict, ref: dict, rtol: float, atol: float, vocab: int, what: str, compare_losses: bool = True
) -> None:
    """Compare every recorded quantity; padded vocabulary rows are compared too (they must stay 0).

    ``compare_losses=False`` when ``got`` recorded micro-batch losses and ``ref`` whole-batch ones.
    """
    if compare_losses:
        torch.testing.assert_close(
            torch.tensor(got["losses"]),
            torch.tensor(ref["losses"]),
            rtol=rtol,
            atol=atol,
            msg=lambda m: f"{what} loss: {m}",
        )
    for key in ("grads", "clipped"):
        assert len(got[key]) == len(ref[key]), (
            f"{what}: {len(got[key])} {key} steps, expected {len(ref[key])}"
        )
        for step, (g, r) in enumerate(zip(got[key], ref[key], strict=True)):
            assert g.keys() == r.keys(), f"{what} {key}: parameter names differ: {sorted(set(g) ^ set(r))}"
            for name in r:
                torch.testing.assert_close(
                    g[name],
                    r[name],
                    rtol=rtol,
                    atol=atol,
                    msg=lambda m, n=name, s=step, k=key: f"{what} {k} step {s} {n}: {m}",
                )
    if ref["norms"]:
        torch.testing.assert_close(
            torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=rtol, atol=atol
        )
    # Final weights: Adam divides each gradient by its running RMS, so an element whose gradient is at
    # round-off level (~1e-9) moves by a step whose size depends on that round-off. Such elements may
    # differ by a small fraction of one update (lr = 1e-3): 1e-5 absolute is 1% of one step.
    for name, r in ref["params"].items():
        torch.testing.assert_close(
            got["params"][name], r, rtol=rtol, atol=1e-5, msg=lambda m, n=name: f"{what} weights {n}: {m}"
        )
