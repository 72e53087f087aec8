"""Tokens/s of pipeline parallel (pp=2) per schedule against one process, side by side in one run.

    python benchmarks/pp_speed.py                 # GPT n_embd 512, 8 layers, seq 256, 8 microbatches
    python benchmarks/pp_speed.py --repeat 3      # medians over 3 rounds
    python benchmarks/pp_speed.py --pp4           # also pp=4 (4 processes on 2 cores: reported only)
    python benchmarks/pp_speed.py --smoke         # tiny shape, 2 steps: checks the script still runs

Variants, all on the same GPT, the same 8 microbatches of one sequence each, AdamW, one thread per process:

* ``one_process``: plain PyTorch in one process, the 8 microbatches one after the other (forward and
  backward, gradients accumulated), then the optimizer step: the baseline;
* ``torch_<schedule>``: pp=2 with ``torch.distributed.pipelining`` driven by hand (a loop calling
  ``schedule.step`` and the optimizer, no Lightning), on the same stage split;
* ``lightning_<schedule>``: pp=2 through ``lightning.Trainer`` and :class:`PipelineParallelStrategy`.

The ideal speed-up of a plain schedule is ``p m / (m + p - 1)`` (1.78x at p=2, m=8). The measured bubble
comes from the strategy's timeline of one step (``lightning_par.callbacks.PipelineTimeline``).
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

SHAPE = dict(vocab_size=4096, n_layer=8, n_head=8, n_embd=512, block_size=256)
SMOKE = dict(vocab_size=256, n_layer=4, n_head=2, n_embd=32, block_size=16)
SCHEDULE_NAMES = ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv"]


def _batches(shape: dict, batch: int, count: int) -> list[dict]:
    import torch

    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)


def _one_process(rank: int, world: int, shape: dict, micro: int, warmup: int, steps: int) -> dict:
    import torch
    from lightning_par.models.gpt import GPTConfig, GPTNetwork

    from lightning_par.initialization import fill_parameters

    torch.set_num_threads(1)
    cfg = GPTConfig(**shape)
    net = GPTNetwork(cfg, cfg.padded_vocab_size(1))
    fill_parameters(net, net.random_init_source(0))
    opt = _optimizer(net)
    times = []
    for batch in _batches(shape, micro, warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = net.count_loss_tokens(batch["labels"])
        for ids, labels in zip(batch["input_ids"].split(1), batch["labels"].split(1), strict=True):
            loss_sum, _ = net.loss_fn(net(ids), labels)
            (loss_sum / total).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[warmup:])}


def _torch_by_hand(
    rank: int, world: int, schedule: str, shape: dict, micro: int, warmup: int, steps: int
) -> dict:
    """torch.distributed.pipelining driven by a plain loop (the split is the strategy's, for a fair match)."""
    import torch
    import torch.distributed as dist
    from lightning_par.models.gpt import GPTConfig, GPTNetwork
    from torch.distributed.pipelining import PipelineStage

    from lightning_par.initialization import fill_parameters
    from lightning_par.pipeline.schedules import SCHEDULES
    from lightning_par.pipeline.split import plan_stages, plan_views, prune_network

    torch.set_num_threads(1)
    cfg = GPTConfig(**shape)
    with torch.device("meta"):
        net = GPTNetwork(cfg, cfg.padded_vocab_size(1))
    plan = plan_stages(net, schedule, world, rank, None)
    prune_network(net, plan)
    net.to_empty(device="cpu")
    fill_parameters(net, net.random_init_source(0))
    views = list(plan_views(net, plan).values())
    stages = [
        PipelineStage(v, s, plan.num_stages, torch.device("cpu"))
        for v, s in zip(views, plan.stages, strict=True)
    ]
    scale = {}

    def loss_fn(output, labels):
        loss_sum, _ = net.loss_fn(output, labels)
        return loss_sum * scale["inv_tokens"]

    sched = SCHEDULES[schedule](
        stages if len(stages) > 1 else stages[0], n_microbatches=micro, loss_fn=loss_fn, scale_grads=False
    )
    opt = _optimizer(net)
    # First and last stage on different ranks (not under ZBV's V shape): their tied weights' gradients
    # are summed, as the strategy does.
    holders = sorted(
        {r for r in range(world) for s in (0, plan.num_stages - 1) if s in _stages_of(schedule, world, r)}
    )
    tie_group = dist.new_group(holders) if len(holders) > 1 else None
    tied = None
    if tie_group is not None and rank in holders:
        tied = net.embed.wte.weight if net.embed is not None else net.head.weight
    times = []
    for batch in _batches(shape, micro, warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        scale["inv_tokens"] = 1.0 / net.count_loss_tokens(batch["labels"]).float()
        losses: list = []
        args = (batch["input_ids"],) if plan.has_first else ()
        sched.step(
            *args, target=batch["labels"] if plan.has_last else None, losses=losses, return_outputs=False
        )
        if tied is not None:  # the same model: the head tied to the embedding on another rank
            dist.all_reduce(tied.grad, group=tie_group)
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    return {"step_s": statistics.median(times[warmup:])}


def _stages_of(schedule: str, world: int, rank: int) -> list[int]:
    from lightning_par.pipeline.schedules import stage_placement

    return stage_placement(schedule, world, None)[rank]


def _lightning_nonfinite_off(
    rank: int, world: int, schedule: str, shape: dict, micro: int, warmup: int, steps: int
) -> dict:
    """The strategy without the per-step NaN/Inf check: what the check costs, side by side."""
    return _lightning(rank, world, schedule, shape, micro, warmup, steps, nonfinite="off")


def _lightning(
    rank: int,
    world: int,
    schedule: str,
    shape: dict,
    micro: int,
    warmup: int,
    steps: int,
    nonfinite: str = "stop",
) -> dict:
    import lightning as L
    import torch
    from lightning_par.callbacks import PipelineTimeline
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            self.starts.append(time.perf_counter())

    class Fixed(GPT):
        def configure_optimizers(self):  # the same optimizer as the hand-driven loops (no scheduler)
            return _optimizer(self)

    rows = [
        dict(input_ids=b["input_ids"][i], labels=b["labels"][i])
        for b in _batches(shape, micro, warmup + steps)
        for i in range(micro)
    ]
    strategy = lightning_par.PipelineParallelStrategy(
        pipeline_schedule=schedule, num_microbatches=micro, nonfinite=nonfinite
    )
    timer, timeline = StepTimer(), PipelineTimeline()
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        strategy,
        world,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[timer, timeline],
        default_root_dir=str(ROOT / "runs" / "bench"),
    )
    trainer.fit(Fixed(**shape, init_seed=0), DataLoader(rows, batch_size=micro))
    times = [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:], strict=True)]
    summary = timeline.summary or {}
    return {
        "step_s": statistics.median(times[warmup:]),
        "bubble": summary.get("bubble_measured"),
        "bubble_theory": summary.get("bubble_theory"),
        "busy_s": [round(r["forward_s"] + r["backward_s"], 3) for r in summary.get("ranks", [])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over all variants; medians are reported"
    )
    parser.add_argument("--schedules", default=",".join(SCHEDULE_NAMES))
    parser.add_argument("--pp4", action="store_true", help="also run 1f1b and gpipe at pp=4 (reported only)")
    parser.add_argument(
        "--nonfinite-off", action="store_true", help="also run the strategy with nonfinite='off' (its cost)"
    )
    args = parser.parse_args()
    from tests.harness import run_distributed

    shape = SMOKE if args.smoke else SHAPE
    steps, warmup = (2, 2) if args.smoke else (args.steps, args.warmup)
    m = args.microbatches
    tokens = m * shape["block_size"]
    schedules = args.schedules.split(",")
    variants: list[tuple[str, int, object, tuple]] = [("one_process", 1, _one_process, ())]
    for s in schedules:
        variants.append((f"torch_{s}", 2, _torch_by_hand, (s,)))
        variants.append((f"lightning_{s}", 2, _lightning, (s,)))
        if args.nonfinite_off:
            variants.append((f"lightning_{s}_nonfinite_off", 2, _lightning_nonfinite_off, (s,)))
    if args.pp4:
        for s in ("gpipe", "1f1b"):
            variants.append((f"pp4_torch_{s}", 4, _torch_by_hand, (s,)))
            variants.append((f"pp4_lightning_{s}", 4, _lightning, (s,)))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    for round_ in range(args.repeat):
        for name, world, fn, extra in variants:  # alternate, so a slow spell of the machine hits them all
            r = run_distributed(
                fn,
                world,
                *extra,
                shape,
                m,
                warmup,
                steps,
                init_process_group=fn not in (_lightning, _lightning_nonfinite_off),
                timeout=900,
            )[0]
            runs[name].append(r)
            print(
                f"round {round_}: {name:34s} step {r['step_s'] * 1000:8.1f} ms  tokens/s {tokens / r['step_s']:8.1f}",
                flush=True,
            )

    def med(rs: list[dict], key: str):
        values = [r[key] for r in rs if r.get(key) is not None]
        if values and isinstance(values[0], list):
            return [statistics.median(v) for v in zip(*values, strict=True)]
        return statistics.median(values) if values else None

    results = {name: {k: med(rs, k) for k in rs[0]} for name, rs in runs.items()}
    base = results["one_process"]["step_s"]
    print(f"\nmedians over {args.repeat} round(s); m={m} microbatches of {shape['block_size']} tokens")
    print(f"one process: {base * 1000:.1f} ms/step, {tokens / base:.1f} tokens/s")
    print(
        f"{'schedule':26s} {'torch x':>8s} {'lightning x':>12s} {'light/torch':>12s} {'of ideal':>9s} "
        f"{'bubble':>8s} {'theory':>8s}"
    )
    for prefix, p in (("", 2), ("pp4_", 4)):
        ideal = p * m / (m + p - 1)
        for s in schedules if p == 2 else (["gpipe", "1f1b"] if args.pp4 else []):
            t, lt = results[f"{prefix}torch_{s}"], results[f"{prefix}lightning_{s}"]
            sp_t, sp_l = base / t["step_s"], base / lt["step_s"]
            bubble = f"{lt['bubble']:.3f}" if lt["bubble"] is not None else "-"
            theory = f"{lt['bubble_theory']:.3f}" if lt["bubble_theory"] is not None else "-"
            print(
                f"pp={p} {s:21s} {sp_t:7.3f}x {sp_l:11.3f}x {sp_l / sp_t:12.3f} {sp_l / ideal:9.3f} "
                f"{bubble:>8s} {theory:>8s}   busy per rank (s): {lt.get('busy_s')}"
            )
        if p == 2:
            print(f"(ideal for plain schedules at p={p}, m={m}: {ideal:.3f}x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
