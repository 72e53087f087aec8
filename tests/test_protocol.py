"""A transformer written from the model protocol alone trains under tp=2 and pp=2 like in one process.

The LightningModule below uses nothing of the package's models (no GPT, no ``models.blocks``): only the
protocol (README, "Bring your own model") and the layers of :mod:`lightning_par.tensor_parallel`. Each
test spawns one process group for its layout, trains a few SGD steps through ``lightning.Trainer`` with
the strategy, and compares the loss of every step and every parameter's gradient with an independent
one-process run of the same module class (plain PyTorch loop, same seeded weights, same batches).
"""

from __future__ import annotations

import hashlib

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.utils.data import DataLoader, Dataset

import lightning_par
from lightning_par.tensor_parallel import (
    ColumnParallel,
    LayerNorm,
    ParallelEmbedding,
    ParallelLinear,
    RowParallel,
    VocabParallel,
    local,
    vocab_parallel_cross_entropy,
)
from tests.harness import run_distributed
from tests.parity import full, quiet_trainer

VOCAB, N_EMBD, N_HEAD, N_LAYER, SEQ, BATCH = 64, 32, 2, 4, 16, 4
STEPS, MICROBATCHES, INIT_SEED = 3, 2, 1234
# The parallel runs compute the same sums as one process in another order (partial matmuls all-reduced
# over tp, the vocabulary-parallel softmax, microbatch gradients accumulated by the pipeline schedule):
# only fp32 round-off separates them, a few ulps, so 1e-5 relative. Round-off is relative to the terms of
# a sum, not to its result: a gradient element where large terms cancel to near zero is compared with an
# absolute floor of RTOL x the largest gradient of its tensor (measured here: at most 2e-6 x that).
RTOL = 1e-5


# ---- the model, from the protocol only -----------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with separate q, k, v projections (each column-parallel: whole heads/rank)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.head_dim = n_embd // n_head
        self.q = ParallelLinear(n_embd, n_embd)
        # No key bias: it adds the same score to every key of a query, which softmax ignores, so its
        # gradient is zero in exact arithmetic and pure round-off in fp32 (nothing to compare).
        self.k = ParallelLinear(n_embd, n_embd, bias=False)
        self.v = ParallelLinear(n_embd, n_embd)
        self.proj = ParallelLinear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:  # x: [T, B, C]
        T, B = x.shape[0], x.shape[1]

        def heads(t: Tensor) -> Tensor:  # [T, B, h * D] -> [B, h, T, D]; h = the heads this rank holds
            return t.view(T, B, -1, self.head_dim).permute(1, 2, 0, 3)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.proj(y.permute(2, 0, 1, 3).reshape(T, B, -1))


class Layer(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd)
        self.fc = ParallelLinear(n_embd, 4 * n_embd)
        self.out = ParallelLinear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = ParallelEmbedding(VOCAB, N_EMBD)
        self.pos = nn.Embedding(SEQ, N_EMBD)  # not in the plan: a Replicate() DTensor under tp

    def forward(self, ids: Tensor) -> Tensor:  # ids [B, T] -> [T, B, C]
        pos = local(self.pos.weight)[: ids.shape[1]]
        return self.tok(ids.t()) + pos.unsqueeze(1)


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed: Embedding | None = Embedding()
        self.layers = nn.ModuleDict({str(i): Layer(N_EMBD, N_HEAD) for i in range(N_LAYER)})
        self.norm: LayerNorm | None = LayerNorm(N_EMBD)
        self.head: ParallelLinear | None = ParallelLinear(N_EMBD, VOCAB, bias=False)  # untied

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers.values():
            x = layer(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.head is not None:
            x = self.head(x)
        return x  # [T, B, V_local]: the batch stays on dim 1 (the runner's default)

    def loss_fn(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss summed over counted tokens, counted tokens)``; labels ``[B, T]``, -100 ignored."""
        assert self.head is not None
        return vocab_parallel_cross_entropy(logits, labels.t(), self.head.tp)


def fill_(p: Tensor, value: Tensor) -> None:
    """Copy this rank's shard of the full ``value`` into ``p`` (a DTensor parameter or a plain one)."""
    if isinstance(p, DTensor):
        shard = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(shard)
    else:
        p.copy_(value)


class ProtocolLM(L.LightningModule):
    def __init__(self, learning_rate: float = 0.1) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.model: Network | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = Network()
        if self.model.layers["0"].fc.weight.device.type != "meta":
            self.init_weights()  # built for real (one process): fill now

    def check_layout(self, tensor_parallel_size: int, sequence_parallel: bool) -> None:
        if N_HEAD % tensor_parallel_size or VOCAB % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must divide {N_HEAD} and {VOCAB}")

    def tensor_parallel_plan(self, sequence_parallel: bool) -> dict:
        kw = {"sequence_parallel": sequence_parallel}
        layer = "model.layers.*"
        return {
            "model.embed.tok": VocabParallel(VOCAB, **kw),
            **{f"{layer}.attn.{n}": ColumnParallel(**kw) for n in ("q", "k", "v")},
            f"{layer}.attn.proj": RowParallel(**kw),
            f"{layer}.fc": ColumnParallel(**kw),
            f"{layer}.out": RowParallel(**kw),
            "model.head": VocabParallel(VOCAB, **kw),
            # LayerNorms and the position embedding are left out: the strategy replicates them.
        }

    @torch.no_grad()
    def init_weights(self) -> None:
        """Each parameter drawn whole from a generator seeded by its global name; this rank keeps its shard."""
        assert self.model is not None
        for name, p in self.model.named_parameters():
            digest = hashlib.sha256(f"{INIT_SEED}:{name}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            value = torch.randn(p.shape, generator=g)
            if ".ln_" in name or name.startswith("norm."):
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * value
            else:
                value = 0.05 * value
            fill_(p, value.to(p.dtype))

    def _loss(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        runner = getattr(self._trainer.strategy, "pipeline", None) if self._trainer is not None else None
        if runner is not None:  # pipeline parallel: the schedule runs forward and backward
            return runner.loss((input_ids,), labels)
        assert self.model is not None
        return self.model.loss_fn(self.model(input_ids), labels)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        loss_sum, num_tokens = self._loss(batch["input_ids"], batch["labels"])
        return {"loss": loss_sum / num_tokens.clamp(min=1), "num_tokens": num_tokens.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # SGD, not Adam: its update is linear in the gradient, so the weights of later steps differ only by
        # lr x round-off. Adam divides by |g| and turns the round-off of a near-zero gradient element into
        # a visible weight difference, which the next step's gradients would then compare.
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate, momentum=0.9)


# ---- data, recording, reference ------------------------------------------------------------------------
class RandomTokens(Dataset):
    """Random inputs and targets, about a fifth of the targets ignored (-100): token weighting matters."""

    def __init__(self, n: int = STEPS * BATCH) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels[torch.rand(n, SEQ, generator=g) < 0.2] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Record(L.Callback):
    """Per step: the batch this rank trained on, the loss, and every gradient (full tensors) before the step."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Tensor]] = []
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # full_tensor() is a collective: every tp rank walks the same names in the same order.
        self.grads.append({n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _parallel_run(rank: int, world: int, layout: str) -> dict:
    if layout == "tp":
        strategy = lightning_par.TensorParallelStrategy(tensor_parallel_size=2)
    else:
        strategy = lightning_par.PipelineParallelStrategy(
            pipeline_parallel_size=2, num_microbatches=MICROBATCHES
        )
    model = ProtocolLM()
    rec = Record()
    trainer = quiet_trainer(strategy, world, max_steps=STEPS, limit_val_batches=0, callbacks=[rec])
    trainer.fit(model, DataLoader(RandomTokens(), batch_size=BATCH))
    assert model.model is not None
    return {
        "batches": rec.batches,
        "losses": rec.losses,
        "grads": rec.grads,
        "params": {
            n: (
                tuple(p.placements) if isinstance(p, DTensor) else None,
                tuple(local(p).shape),
            )
            for n, p in model.named_parameters()
        },
        "roles": {n: m.tp.kind for n, m in model.named_modules() if getattr(m, "tp", None) is not None},
        "steps": trainer.global_step,
    }


def _reference(batches: list[dict[str, Tensor]]) -> dict:
    """The same module class in one process, plain PyTorch: no Lightning Trainer, no strategy."""
    model = ProtocolLM()
    model.configure_model()
    opt = model.configure_optimizers()
    out: dict = {"losses": [], "grads": [], "names": [n for n, _ in model.named_parameters()]}
    for i, batch in enumerate(batches):
        opt.zero_grad()
        loss = model.training_step(batch, i)["loss"]
        loss.backward()
        out["losses"].append(float(loss.detach()))
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return out


def _assert_matches(losses: list[float], grads: list[dict[str, Tensor]], ref: dict, what: str) -> None:
    assert len(losses) == len(grads) == STEPS, f"{what}: {len(losses)} losses, {len(grads)} gradient steps"
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(ref["losses"], dtype=torch.float64),
        rtol=RTOL,
        atol=0.0,
        msg=lambda m: f"{what} losses: {m}",
    )
    for step, (got, want) in enumerate(zip(grads, ref["grads"], strict=True)):
        assert sorted(got) == sorted(want), f"{what} step {step}: gradients of {sorted(set(got) ^ set(want))}"
        for name, g in want.items():
            assert got[name].shape == g.shape, f"{what} step {step} {name}: shape {got[name].shape}"
            scale = float(g.abs().max())
            assert scale > 0, f"{what} step {step} {name}: the reference gradient is zero"
            torch.testing.assert_close(
                got[name],
                g,
                rtol=RTOL,
                atol=RTOL * scale,
                msg=lambda m, n=name, s=step: f"{what} step {s} {n}: {m}",
            )


def _same_batches_on_every_rank(results: list[dict]) -> list[dict[str, Tensor]]:
    batches = results[0]["batches"]
    assert len(batches) == STEPS
    for r in results[1:]:
        for a, b in zip(batches, r["batches"], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), "pipeline/tensor-parallel peers saw other batches"
    return batches


# ---- tests ---------------------------------------------------------------------------------------------
def test_protocol_model_tp2_matches_one_process():
    """tp=2: the plan shards what it names (and the strategy replicates the rest); each rank's loss and the
    full gradient of every parameter equal the one-process run at every step."""
    results = run_distributed(_parallel_run, 2, "tp", init_process_group=False)
    ref = _reference(_same_batches_on_every_rank(results))
    for rank, res in enumerate(results):
        assert res["steps"] == STEPS
        params = res["params"]
        assert sorted(params) == sorted(ref["names"])
        hidden, vocab = N_EMBD // 2, VOCAB // 2
        expected = {
            "model.embed.tok.weight": ((Shard(0),), (vocab, N_EMBD)),
            "model.embed.pos.weight": ((Replicate(),), (SEQ, N_EMBD)),
            "model.layers.0.attn.q.weight": ((Shard(0),), (hidden, N_EMBD)),
            "model.layers.0.attn.q.bias": ((Shard(0),), (hidden,)),
            "model.layers.1.attn.proj.weight": ((Shard(1),), (N_EMBD, hidden)),
            "model.layers.1.attn.proj.bias": ((Replicate(),), (N_EMBD,)),
            "model.layers.2.fc.weight": ((Shard(0),), (2 * N_EMBD, N_EMBD)),
            "model.layers.3.out.weight": ((Shard(1),), (N_EMBD, 2 * N_EMBD)),
            "model.layers.3.ln_2.weight": ((Replicate(),), (N_EMBD,)),
            "model.norm.bias": ((Replicate(),), (N_EMBD,)),
            "model.head.weight": ((Shard(0),), (vocab, N_EMBD)),
        }
        for name, want in expected.items():
            assert params[name] == want, f"rank {rank} {name}: {params[name]}, expected {want}"
        assert all(placements is not None for placements, _ in params.values()), "a plain parameter under tp"
        roles = res["roles"]
        assert roles["model.embed.tok"] == "vocab" and roles["model.head"] == "column"  # vocab-split head
        assert roles["model.layers.0.attn.k"] == "column" and roles["model.layers.0.out"] == "row"
        assert roles["model.layers.0.ln_1"] == "replicated" and roles["model.embed.pos"] == "replicated"
        _assert_matches(res["losses"], res["grads"], ref, f"tp2 rank {rank}")


def test_protocol_model_pp2_matches_one_process():
    """pp=2 (1F1B, 2 microbatches): the ranks hold disjoint stages (embedding first, norm and head last)
    whose union is the whole model; the batch loss on every rank and every gradient equal one process."""
    results = run_distributed(_parallel_run, 2, "pp", init_process_group=False)
    ref = _reference(_same_batches_on_every_rank(results))
    first, last = (set(r["params"]) for r in results)
    assert not first & last, f"parameters on both pipeline ranks: {sorted(first & last)}"
    assert sorted(first | last) == sorted(ref["names"])
    assert all(placements is None for r in results for placements, _ in r["params"].values())
    assert {n for n in first if not n.startswith("model.layers.")} == {
        "model.embed.tok.weight",
        "model.embed.pos.weight",
    }
    assert {n.split(".")[1] for n in last if not n.startswith("model.layers.")} == {"norm", "head"}
    layers = [
        {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")} for names in (first, last)
    ]
    assert layers[0] and layers[1] and max(layers[0]) < min(layers[1]), f"stage layers {layers}"
    for res in results:
        assert res["steps"] == STEPS
        # The schedule's loss is broadcast from the last stage: every rank returns the batch's loss.
        torch.testing.assert_close(
            torch.tensor(res["losses"]), torch.tensor(results[-1]["losses"]), rtol=0, atol=0
        )
    merged = [{**a, **b} for a, b in zip(results[0]["grads"], results[1]["grads"], strict=True)]
    _assert_matches(results[0]["losses"], merged, ref, "pp2")
