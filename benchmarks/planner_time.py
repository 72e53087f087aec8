"""The planner's step-time predictions against measured steps, on 2 and 4 gloo processes.

    python benchmarks/planner_time.py                      # calibrates, then 11 layouts of one GPT
    python benchmarks/planner_time.py --profile cpu.json   # reuse a profile from `lightning-par plan --calibrate`
    python benchmarks/planner_time.py --smoke              # tiny shape, 2 layouts, 1 timed step

Every layout trains the same GPT through ``lightning.Trainer`` with ``HybridParallelStrategy``; the step
time is the median of the timed steps. Printed: predicted and measured ms per step, their ratio, the
Spearman rank correlation per process count, and whether the planner's pick for 2 processes was the
fastest measured (or within 5% of it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(vocab_size=4096, n_layer=4, n_head=8, n_embd=256, block_size=128)
SMOKE = dict(vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=16)
BATCH = 8  # global batch (sequences per step)
# name -> (processes, planner Layout fields)
LAYOUTS = {
    "tp2": (2, dict(tp=2, pp=1, dp=1)),
    "tp2 sp": (2, dict(tp=2, pp=1, dp=1, sequence_parallel=True)),
    "dp2": (2, dict(tp=1, pp=1, dp=2)),
    "dp2 distopt": (2, dict(tp=1, pp=1, dp=2, distributed_optimizer=True)),
    "dp2 full": (2, dict(tp=1, pp=1, dp=2, recompute="full")),
    "pp2 1f1b": (2, dict(tp=1, pp=2, dp=1, schedule="1f1b")),
    "pp2 gpipe": (2, dict(tp=1, pp=2, dp=1, schedule="gpipe")),
    "dp4": (4, dict(tp=1, pp=1, dp=4)),
    "tp2 dp2": (4, dict(tp=2, pp=1, dp=2)),
    "tp2 pp2": (4, dict(tp=2, pp=2, dp=1, schedule="1f1b")),
    "pp4": (4, dict(tp=1, pp=4, dp=1, schedule="1f1b")),
}
SMOKE_LAYOUTS = ("dp2", "pp2 1f1b")


def _layout(fields: dict, batch: int):
    from lightning_par.planner import Layout

    dp, pp = fields["dp"], fields["pp"]
    per_replica = batch // dp
    micro = 1 if pp > 1 else per_replica
    return Layout(**{**fields, "micro_batch_size": micro, "num_microbatches": per_replica // micro})


def _run_all(
    rank: int, world: int, layouts: list[dict], shape: dict, batch: int, warmup: int, steps: int
) -> list[float]:
    """Each layout's median step time, one after another in this spawn (process start costs seconds)."""
    return [_run(rank, world, fields, shape, batch, warmup, steps) for fields in layouts]


def _run(rank: int, world: int, fields: dict, shape: dict, batch: int, warmup: int, steps: int) -> float:
    import lightning as L
    import torch
    from lightning_par.models import GPT
    from torch.utils.data import DataLoader

    import lightning_par
    from benchmarks.common import RandomTokens, StepTimer
    from tests.parity import quiet_trainer

    torch.set_num_threads(1)
    layout = _layout(fields, batch)

    strategy = lightning_par.HybridParallelStrategy(
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        data_parallel_size=layout.dp,
        sequence_parallel=layout.sequence_parallel,
        pipeline_schedule=layout.schedule,
        num_microbatches=layout.num_microbatches if layout.pp > 1 else None,
        distributed_optimizer=layout.distributed_optimizer,
        activation_checkpointing=layout.recompute,
        nonfinite="off",
    )
    timer = StepTimer()
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(strategy, world, max_steps=warmup + steps, callbacks=[timer])
    trainer.fit(
        GPT(**shape, warmup_steps=1),
        DataLoader(
            RandomTokens(shape["vocab_size"], shape["block_size"], batch * (warmup + steps)),
            batch_size=batch // layout.dp,
        ),
    )
    return statistics.median(timer.times[warmup:])


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected among step times)."""

    def ranks(x: list[float]) -> list[int]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0] * len(x)
        for r, i in enumerate(order):
            out[i] = r
        return out

    ra, rb, n = ranks(a), ranks(b), len(a)
    if n < 2:
        return 1.0
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", default=None, help="a device profile .json (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layouts", default=None, help="comma-separated names (default: all)")
    args = parser.parse_args()
    from lightning_par.planner import ModelSpec, calibrate, evaluate, get_device, plan_layouts
    from tests.harness import run_distributed

    shape = SMOKE if args.smoke else SHAPE
    steps, warmup = (1, 1) if args.smoke else (args.steps, args.warmup)
    names = (
        list(SMOKE_LAYOUTS) if args.smoke else (args.layouts.split(",") if args.layouts else list(LAYOUTS))
    )
    if args.profile:
        device = get_device(args.profile)
    else:
        path = Path(tempfile.mkdtemp()) / "cpu.json"
        device = calibrate(path, world=2, repeat=1 if args.smoke else 5)
        print(f"calibrated: {path}")
    spec = ModelSpec.from_any(shape)
    rows = []
    for world in sorted({LAYOUTS[name][0] for name in names}):
        group = [name for name in names if LAYOUTS[name][0] == world]
        measured = run_distributed(
            _run_all,
            world,
            [LAYOUTS[name][1] for name in group],
            shape,
            BATCH,
            warmup,
            steps,
            init_process_group=False,
            timeout=3000,
        )
        for i, name in enumerate(group):
            layout = _layout(LAYOUTS[name][1], BATCH)
            plan = evaluate(spec, layout, device, world, BATCH, shape["block_size"], "32-true")
            predicted, slowest_rank = plan.prediction["step_s"], max(m[i] for m in measured)
            rows.append((name, world, predicted, slowest_rank))
            print(
                f"{name:12s} {world} proc  predicted {predicted * 1e3:8.1f} ms  measured {slowest_rank * 1e3:8.1f} ms"
            )
    print(f"\n{'layout':12s} {'procs':>5s} {'predicted ms':>13s} {'measured ms':>12s} {'ratio':>6s}")
    for name, world, p, m in rows:
        print(f"{name:12s} {world:5d} {p * 1e3:13.1f} {m * 1e3:12.1f} {p / m:6.2f}")
    summary = {}
    for world in sorted({r[1] for r in rows}):
        sub = [r for r in rows if r[1] == world]
        rho = spearman([r[2] for r in sub], [r[3] for r in sub])
        summary[world] = rho
        print(f"spearman ({world} processes, {len(sub)} layouts): {rho:.3f}")
    two = [r for r in rows if r[1] == 2]
    if two:
        # The pick among the measured layouts (micro-batches as _layout makes them).
        candidates = [
            (
                r[0],
                evaluate(
                    spec, _layout(LAYOUTS[r[0]][1], BATCH), device, 2, BATCH, shape["block_size"], "32-true"
                ),
            )
            for r in two
        ]
        free = plan_layouts(spec, 2, 2, device, BATCH, shape["block_size"], "32-true", top=1)[0]
        name, pick = min(candidates, key=lambda c: c[1].prediction["step_s"])
        print(f"planner's best of every layout: {free.describe()}")
        print(f"planner's pick for 2 processes: {name} ({pick.describe()})")
        measured_pick = next(r[3] for r in two if r[0] == name)
        fastest = min(two, key=lambda r: r[3])
        print(
            f"fastest measured on 2 processes: {fastest[0]} ({fastest[3] * 1e3:.1f} ms); the pick measured "
            f"{measured_pick * 1e3:.1f} ms, {measured_pick / fastest[3]:.3f}x the fastest"
        )
    print(json.dumps({"rows": rows, "spearman": summary}))


if __name__ == "__main__":
    main()
