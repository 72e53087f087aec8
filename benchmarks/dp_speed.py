"""Tokens/s of data parallel (dp=2) against Lightning's own DDPStrategy, side by side in one run.

    python benchmarks/dp_speed.py --repeat 3   # GPT n_embd 512, 4 layers, seq 256, batch 8 per rank
    python benchmarks/dp_speed.py --smoke      # tiny shape: checks the script still runs

Variants (AdamW, fp32, no clipping, one thread per process, through ``lightning.Trainer``; they alternate
round by round):

* ``dp1``: one process, Lightning's default strategy (the baseline);
* ``ours``: ``HybridParallelStrategy(data_parallel_size=2)``: buckets launched from backward;
* ``ours_after_backward``: the same with ``overlap_grad_reduce=False`` (one reduction after backward);
* ``ddp``: Lightning's ``DDPStrategy`` (torch DDP: 25 MB buckets overlapped with backward).

For ours, the exposed communication is the wait before the step (``comm/grad_exposed_s``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=4096, n_layer=4, n_head=8, n_embd=512, block_size=256)
SMOKE = dict(vocab_size=256, n_layer=1, n_head=2, n_embd=32, block_size=16)
VARIANTS = ("dp1", "ours", "ours_after_backward", "ddp")


def _variant(rank: int, world: int, name: str, shape: dict, batch: int, warmup: int, steps: int) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from benchmarks.common import RandomTokens, StepTimer
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)

    if name == "dp1":
        strategy = "auto"
    elif name == "ddp":
        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = lightning_par.HybridParallelStrategy(
            tensor_parallel_size=1, data_parallel_size=world, overlap_grad_reduce=name == "ours"
        )
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = quiet_trainer(strategy, world, max_steps=warmup + steps, callbacks=[timer])
    trainer.fit(
        GPT(**shape, warmup_steps=2),
        DataLoader(
            RandomTokens(shape["vocab_size"], shape["block_size"], batch * (warmup + steps + 2) * world),
            batch_size=batch,
        ),
    )
    return {
        "step_s": statistics.median(timer.times[warmup:]),
        "exposed_s": statistics.median(timer.exposed[warmup:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all variants; medians reported")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    from tests.harness import run_distributed

    shape, batch = (SMOKE, 2) if args.smoke else (SHAPE, 8)
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.repeat):
        for name in names:
            world = 1 if name == "dp1" else 2
            r = run_distributed(
                _variant, world, name, shape, batch, warmup, steps, init_process_group=False, timeout=1800
            )[0]
            runs[name].append(r)
            tokens = world * batch * shape["block_size"]
            print(
                f"round {round_}: {name:20s} step {r['step_s'] * 1000:8.1f} ms  tokens/s {tokens / r['step_s']:8.1f}  exposed {r['exposed_s'] * 1000:6.1f} ms",
                flush=True,
            )
    res = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    tps = {n: (1 if n == "dp1" else 2) * batch * shape["block_size"] / r["step_s"] for n, r in res.items()}
    print(f"\nmedians of {args.repeat} round(s):")
    for n, r in res.items():
        line = f"  {n:20s} {r['step_s'] * 1000:8.1f} ms/step  {tps[n]:8.1f} tokens/s"
        if "dp1" in tps and n != "dp1":
            line += f"  {tps[n] / tps['dp1']:.3f}x dp1"
        if n.startswith("ours"):
            line += f"  exposed communication {r['exposed_s'] * 1000:.1f} ms"
        print(line)
    if "ddp" in tps:
        for n in ("ours", "ours_after_backward"):
            if n in tps:
                print(f"  {n} / ddp tokens/s: {tps[n] / tps['ddp']:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
