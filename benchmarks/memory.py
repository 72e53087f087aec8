"""Per-rank memory and step time of the memory options, dp=2 on 2 processes, side by side in one run.

    python benchmarks/memory.py --repeat 3     # the issue's shape: GPT n_embd 1024, 8 layers, seq 512
    python benchmarks/memory.py --smoke        # tiny shape, checks the script still runs

Variants (every one dp=2, AdamW, fp32, through ``lightning.Trainer``; they alternate round by round):

* ``baseline``: the optimizer state repeated on both replicas;
* ``distopt``: ``distributed_optimizer=True`` (ZeRO-1: moments sharded over the replicas);
* ``distopt+full``: with ``activation_checkpointing="full"``;
* ``distopt+selective``: with ``activation_checkpointing="selective"``.

Memory comes from :class:`lightning_par.callbacks.MemoryReport` (step 1, after the state exists); the
analytical figures beside it are 4 bytes per local parameter for weights and gradients, 8 / d for AdamW's
moments (d = 1 without the distributed optimizer), and, under ``full``, the block inputs:
layers x b x s x h x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=4096, n_layer=8, n_head=16, n_embd=1024, block_size=512)
SMOKE = dict(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=16)
VARIANTS = {
    "baseline": {},
    "distopt": {"distributed_optimizer": True},
    "distopt+full": {"distributed_optimizer": True, "activation_checkpointing": "full"},
    "distopt+selective": {"distributed_optimizer": True, "activation_checkpointing": "selective"},
}


def _variant(rank: int, world: int, name: str, shape: dict, batch: int, warmup: int, steps: int) -> dict:
    import lightning as L
    import torch
    from lightning_par.callbacks import MemoryReport
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from benchmarks.common import RandomTokens, StepTimer
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)

    L.seed_everything(0, verbose=False)
    timer, memory = StepTimer(), MemoryReport(step=1)
    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=1, data_parallel_size=world, nonfinite="off", **VARIANTS[name]
    )
    trainer = quiet_trainer(strategy, world, max_steps=warmup + steps, callbacks=[timer, memory])
    model = GPT(**shape, warmup_steps=2)
    trainer.fit(
        model,
        DataLoader(
            RandomTokens(shape["vocab_size"], shape["block_size"], batch * (warmup + steps + 2) * world),
            batch_size=batch,
        ),
    )
    # (step 1, measured by the report, counts saved tensors: it is not timed)
    times = [t for i, t in enumerate(timer.times) if i >= warmup and i != 1]
    numel = sum(p.numel() for p in model.parameters())
    return {"step_s": statistics.median(times), **memory.report, "numel": numel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 timed step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all variants; medians reported")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    from tests.harness import run_distributed

    shape, batch = (SMOKE, 2) if args.smoke else (SHAPE, 4)
    steps, warmup = (1, 2) if args.smoke else (args.steps, args.warmup)
    names = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeat):
        for name in names:  # alternating, so a slow spell of the machine hits every variant
            r = run_distributed(
                _variant, 2, name, shape, batch, warmup, steps, init_process_group=False, timeout=3000
            )[0]
            runs[name].append(r)
            print(f"round {round_}: {name:18s} step {r['step_s']:7.2f} s", flush=True)
    res = {
        n: {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None for k in rs[0]}
        for n, rs in runs.items()
    }
    mib = 2**20
    numel = next(iter(res.values()))["numel"]
    b, s, h, layers = batch, shape["block_size"], shape["n_embd"], shape["n_layer"]
    print(f"\nper rank, medians of {args.repeat} round(s); {numel:,} parameters, dp=2")
    print(
        f"{'variant':18s} {'params':>9s} {'grads':>9s} {'optimizer':>10s} {'activ. peak':>12s} {'step s':>7s}  analytical (params/grads/optimizer)"
    )
    for name, r in res.items():
        d = 2 if "distopt" in name else 1
        analytic = (4 * numel / mib, 4 * numel / mib, 8 * numel / d / mib)
        print(
            f"{name:18s} {r['params'] / mib:8.1f}M {r['grads'] / mib:8.1f}M {r['optimizer'] / mib:9.1f}M "
            f"{r['activations_peak'] / mib:11.1f}M {r['step_s']:7.2f}  "
            + " / ".join(f"{x:.1f}M" for x in analytic)
        )
    print(f"analytical block inputs under full recomputation: {layers * b * s * h * 4 / mib:.1f}M")
    ratios = {}
    if "baseline" in res and "distopt" in res:
        ratios["optimizer distopt / baseline"] = res["distopt"]["optimizer"] / res["baseline"]["optimizer"]
    for mode in ("full", "selective"):
        key = f"distopt+{mode}"
        if key in res and "distopt" in res:
            ratios[f"activations {mode} / none"] = (
                res[key]["activations_peak"] / res["distopt"]["activations_peak"]
            )
            ratios[f"step time {mode} / none"] = res[key]["step_s"] / res["distopt"]["step_s"]
    print(
        "\nratios (targets: optimizer <= 0.5, full activations <= 0.25 and step <= 1.4x, selective step <= 1.1x):"
    )
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(json.dumps({"results": res, "ratios": ratios}))


if __name__ == "__main__":
    main()
