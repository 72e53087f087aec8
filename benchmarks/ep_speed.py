"""Tokens/s of expert parallel (ep=2) against ep=1, and the bytes its all-to-all moves, side by side.

    python benchmarks/ep_speed.py               # MoE GPT: n_embd 512, 8 experts, top-2, 4 layers, seq 256
    python benchmarks/ep_speed.py --repeat 3    # medians over 3 rounds
    python benchmarks/ep_speed.py --smoke       # tiny shape, 2 steps: checks the script still runs

Every variant trains the same MoE GPT (every second layer MoE, dropless, vocab 4096) with AdamW on batches
of 8 sequences per rank, one thread per process:

* ``hand_ep1`` / ``hand_ep2``: a minimal loop without Lightning: the network with its experts split over the
  ranks by hand (two all-to-all exchanges per MoE layer), dense gradients averaged in one flat bucket,
  expert gradients divided by the number of ranks;
* ``lightning_ep1`` / ``lightning_ep2``: ``lightning.Trainer`` with :class:`ExpertParallelStrategy` on one
  and on two processes (ep = dp = devices);
* ``alone_x2``: two processes that each run ``hand_ep1`` with no communication at all: what two processes
  get from the machine (shared memory bandwidth and caches), the ceiling for any 2-process speed-up.

ep=2 processes twice the tokens per step (8 sequences on each rank), so perfect scaling is 2.0x; each rank
also updates only its own experts' optimizer state. In ``lightning_ep2`` every ``dist.all_to_all_single``
is counted: token bytes per step against the analytical count (assignments x n_embd x element size, there
and back, forward and backward, per MoE layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(
    vocab_size=4096,
    n_layer=4,
    n_head=8,
    n_embd=512,
    block_size=256,
    num_experts=8,
    moe_top_k=2,
    moe_layer_freq=2,
)
SMOKE = dict(SHAPE, vocab_size=256, n_embd=32, n_head=2, block_size=16, num_experts=4)
BATCH = 8


def _batches(shape: dict, rank: int, count: int) -> list[dict]:
    import torch

    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(1000 * rank + i)
        ids = torch.randint(0, shape["vocab_size"], (BATCH, shape["block_size"]), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _optimizer(params):
    import torch

    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), foreach=True)


def _hand(rank: int, world: int, shape: dict, warmup: int, steps: int) -> dict:
    """The minimal expert-parallel loop: what the strategy's overhead is measured against."""
    import torch
    import torch.distributed as dist
    from lightning_par.models.gpt import GPTConfig, GPTNetwork
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from lightning_par.initialization import fill_parameters

    torch.set_num_threads(1)
    cfg = GPTConfig(**shape)
    with torch.device("meta"):
        net = GPTNetwork(cfg, cfg.padded_vocab_size(1))
    for moe in net.moe_modules().values():
        moe.shard_experts(dist.group.WORLD if world > 1 else None, rank, world)
    net = net.to_empty(device="cpu")
    net.tie_weights()
    fill_parameters(net, net.random_init_source(0))
    experts = {id(p) for m in net.moe_modules().values() for p in m.experts.parameters()}
    dense = [p for p in net.parameters() if id(p) not in experts]
    mine = [p for p in net.parameters() if id(p) in experts]
    opt = _optimizer(net.parameters())
    times = []
    for batch in _batches(shape, rank, warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum, tokens = net.loss_fn(net(batch["input_ids"]), batch["labels"])
        ((loss_sum + net.pop_aux_loss()) / tokens).backward()
        if world > 1:
            grads = [p.grad for p in dense]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(synced)
            # An expert's gradient holds both ranks' (mean) losses: the mean loss over ranks is half of it.
            torch._foreach_div_([p.grad for p in mine], world)
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[warmup:])}


def _alone(rank: int, world: int, shape: dict, warmup: int, steps: int) -> dict:
    """Every process trains its own ep=1 model, no communication at all: only the cores are shared."""
    return _hand(0, 1, shape, warmup, steps)


def _lightning(rank: int, world: int, shape: dict, warmup: int, steps: int) -> dict:
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)
    sent = {"tokens": 0, "counts": 0, "step_bytes": [], "a2a_s": 0.0, "step_a2a_s": [], "exposed": []}
    original = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):  # noqa: A002 (torch's own parameter name)
        kind = "tokens" if input.is_floating_point() else "counts"
        sent[kind] += input.numel() * input.element_size()
        start = time.perf_counter()  # (synchronous: the time inside includes waiting for the peer)
        try:
            return original(output, input, *args, **kwargs)
        finally:
            sent["a2a_s"] += time.perf_counter() - start

    dist.all_to_all_single = counting

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())
            sent["tokens"], sent["a2a_s"] = 0, 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sent["step_bytes"].append(sent["tokens"])
            sent["step_a2a_s"].append(sent["a2a_s"])
            comm = getattr(trainer.strategy, "last_communication", None) or {}
            sent["exposed"].append(comm.get("comm/grad_exposed_s", 0.0))

        def on_train_end(self, trainer, pl_module) -> None:
            self.starts.append(time.perf_counter())

    class Fixed(GPT):
        def configure_optimizers(self):  # the same optimizer as the hand-written loop (no scheduler)
            return _optimizer(self.parameters())

    # Each rank reads the batches the hand-written loop gives it (routing, and so the experts' loads,
    # depend on the tokens: the same data on both sides).
    rows = [
        dict(input_ids=b["input_ids"][i], labels=b["labels"][i])
        for b in _batches(shape, rank, warmup + steps)
        for i in range(BATCH)
    ]
    timer = StepTimer()
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        lightning_par.ExpertParallelStrategy(),
        world,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        default_root_dir=str(ROOT / "runs" / "bench"),
        use_distributed_sampler=False,
    )
    trainer.fit(Fixed(**shape, init_seed=0), DataLoader(rows, batch_size=BATCH))
    dist_times = [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:], strict=True)]
    cfg = trainer.lightning_module.config
    # Every token makes k assignments (dropless), each sent to its expert and back, forward and backward.
    # (A rank sends its own assignments out, and sends back what the others sent it: per rank the second
    # part depends on the routing; summed over the ranks both parts are exact.)
    analytic = BATCH * cfg.block_size * cfg.moe_top_k * cfg.n_embd * 4 * 2 * 2 * len(cfg.moe_layers)
    return {
        "step_s": statistics.median(dist_times[warmup:]),
        "a2a_step_bytes": sent["step_bytes"][warmup:] if world > 1 else None,
        "a2a_analytic": analytic * world if world > 1 else None,
        "a2a_s": statistics.median(sent["step_a2a_s"][warmup:]) if world > 1 else None,
        "dense_exposed_s": statistics.median(sent["exposed"][warmup:]) if world > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all variants; medians reported")
    args = parser.parse_args()
    from tests.harness import run_distributed

    shape = SMOKE if args.smoke else SHAPE
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    variants = [
        ("hand_ep1", 1, _hand),
        ("hand_ep2", 2, _hand),
        ("lightning_ep1", 1, _lightning),
        ("lightning_ep2", 2, _lightning),
        ("alone_x2", 2, _alone),
    ]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    for round_ in range(args.repeat):
        for name, world, fn in variants:  # alternate, so a slow spell of the machine hits them all
            ranks = run_distributed(
                fn, world, shape, warmup, steps, init_process_group=fn is _hand, timeout=900
            )
            r = ranks[0]
            if r.get("a2a_step_bytes") is not None:  # bytes sent by all ranks, per step
                per_step = [sum(v) for v in zip(*(x.pop("a2a_step_bytes") for x in ranks), strict=True)]
                r["a2a_bytes"] = statistics.median(per_step)
                # per step, inside all-to-all: the less loaded rank waits for the other
                r["a2a_s_per_rank"] = [x["a2a_s"] for x in ranks]
                r["a2a_s"] = max(x["a2a_s"] for x in ranks)
            r["tokens_per_s"] = world * BATCH * shape["block_size"] / r["step_s"]
            runs[name].append(r)
            print(
                f"round {round_}: {name:14s} step {r['step_s'] * 1000:8.1f} ms  "
                f"tokens/s {r['tokens_per_s']:8.1f}",
                flush=True,
            )
    results = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float | int)}
        for name, rs in runs.items()
    }
    print(f"\nmedians over {args.repeat} round(s); {BATCH} x {shape['block_size']} tokens per rank and step")
    for kind in ("hand", "lightning"):
        one, two = results[f"{kind}_ep1"], results[f"{kind}_ep2"]
        print(f"{kind:10s} ep2 / ep1 tokens/s: {two['tokens_per_s'] / one['tokens_per_s']:.3f}x")
    ceiling = results["alone_x2"]["tokens_per_s"] / results["hand_ep1"]["tokens_per_s"]
    print(
        f"two independent processes / one (no communication; this machine's ceiling for 2 processes): "
        f"{ceiling:.3f}x"
    )
    lt = results["lightning_ep2"]
    alone = results["alone_x2"]["tokens_per_s"]
    print(
        f"lightning ep2 / two independent processes (tokens/s, target >= 0.95): {lt['tokens_per_s'] / alone:.3f}"
    )
    last = runs["lightning_ep2"][-1]
    print(
        f"lightning ep2, per step (median): inside all-to-all per rank {[round(x * 1000) for x in last['a2a_s_per_rank']]} ms "
        f"(last round), dense-gradient wait before the step {lt['dense_exposed_s'] * 1000:.1f} ms"
    )
    print(
        f"all-to-all token bytes per step, all ranks: {lt['a2a_bytes']:.0f} measured, "
        f"{lt['a2a_analytic']:.0f} analytical, ratio {lt['a2a_bytes'] / lt['a2a_analytic']:.4f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
