"""The planner's step-time predictions against measured steps, on 2 and 4 gloo processes.

    python benchmarks/planner_time.py                      # 14 layouts of one GPT, a calibration per round
    python benchmarks/planner_time.py --profile cpu.json   # reuse a profile from `lightning-par plan --calibrate`
    python benchmarks/planner_time.py --smoke              # tiny shape, 2 layouts, 1 timed step

Every layout trains the same GPT through ``lightning.Trainer`` with ``HybridParallelStrategy``; the step
time is the median of the timed steps, and the layouts alternate round by round (medians of the rounds
are quoted: this machine's speed drifts by 10-40% from one minute to the next). Printed: predicted and
measured ms per step, their ratio, Spearman's rank correlation per process count and over all layouts,
and whether the planner's pick for 2 processes was the fastest measured (or within 5% of it).
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
    "pp2 1f1b m2": (2, dict(tp=1, pp=2, dp=1, schedule="1f1b", micro_batch_size=4)),
    "dp4": (4, dict(tp=1, pp=1, dp=4)),
    "tp2 dp2": (4, dict(tp=2, pp=1, dp=2)),
    "tp2 pp2": (4, dict(tp=2, pp=2, dp=1, schedule="1f1b")),
    "pp4": (4, dict(tp=1, pp=4, dp=1, schedule="1f1b")),
    "pp4 m4": (4, dict(tp=1, pp=4, dp=1, schedule="1f1b", micro_batch_size=2)),
    "tp2 pp2 m2": (4, dict(tp=2, pp=2, dp=1, schedule="1f1b", micro_batch_size=4)),
}
SMOKE_LAYOUTS = ("dp2", "pp2 1f1b")


def _layout(fields: dict, batch: int):
    from lightning_par.planner import Layout

    dp, pp = fields["dp"], fields["pp"]
    per_replica = batch // dp
    micro = fields.get("micro_batch_size", 1 if pp > 1 else per_replica)
    return Layout(**{**fields, "micro_batch_size": micro, "num_microbatches": per_replica // micro})


def _run_round(
    world: int, layouts: list[dict], shape: dict, batch: int, warmup: int, steps: int
) -> list[float]:
    """One round: each layout's step time (the slowest rank's median), each in fresh processes.

    A fresh group per run is what a user's run gets. Runs one after another in the same processes do
    not: every Trainer leaves its gloo groups behind (torch's DeviceMesh caches them), whose threads
    keep using CPU when idle (10 of them 1-2% of a core), and on 2 cores that cost grew round after round
    (4-process steps 1.5-2x slower by the fifth round). The harness forks from a preloaded server, so
    a fresh group costs well under a second.
    """
    from tests.harness import run_distributed

    times = []
    for fields in layouts:
        per_rank = run_distributed(
            _run, world, fields, shape, batch, warmup, steps, init_process_group=False, timeout=900
        )
        times.append(max(per_rank))
    return times


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
    """Spearman's rank correlation: Pearson's of the ranks, tied values sharing their mean rank (the
    model predicts 1F1B and GPipe alike, for one)."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb, n = ranks(a), ranks(b), len(a)
    if n < 2:
        return 1.0
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", default=None, help="a device profile .json (default: calibrate now)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are quoted)")
    parser.add_argument("--layouts", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--calibrate-repeat", type=int, default=2, help="samples per op in each calibration")
    args = parser.parse_args()
    from lightning_par.planner import ModelSpec, calibrate, evaluate, get_device, merge_profiles, plan_layouts

    shape = SMOKE if args.smoke else SHAPE
    steps, warmup = (1, 1) if args.smoke else (args.steps, args.warmup)
    names = (
        list(SMOKE_LAYOUTS) if args.smoke else (args.layouts.split(",") if args.layouts else list(LAYOUTS))
    )
    rounds = 1 if args.smoke else args.rounds
    worlds = sorted({LAYOUTS[name][0] for name in names})
    groups = {world: [name for name in names if LAYOUTS[name][0] == world] for world in worlds}
    # Alternating round by round (A B C A B C, both process counts in each round): this machine's speed
    # drifts from minute to minute. Without --profile each round starts with a calibration of its own
    # and the predictions use their median, so the profile describes the same minutes as the runs.
    profiles, per_round = [], {world: [] for world in worlds}
    for r in range(rounds):
        if not args.profile:
            profiles.append(calibrate(None, world=2, repeat=1 if args.smoke else args.calibrate_repeat))
            p = profiles[-1]
            print(
                f"round {r} calibration: matmul {p.peak_flops / 1e9:.1f} GFLOP/s, AdamW "
                f"{p.optimizer_bandwidth / 1e9:.1f} GB/s, all-reduce {p.intra_node.bandwidth / 1e9:.2f} GB/s "
                f"+ {p.intra_node.latency * 1e3:.2f} ms, step overhead {p.step_overhead * 1e3:.1f} ms",
                flush=True,
            )
        for world in worlds:
            fields = [LAYOUTS[name][1] for name in groups[world]]
            per_round[world].append(_run_round(world, fields, shape, BATCH, warmup, steps))
            print(
                f"round {r}, {world} processes: "
                + ", ".join(
                    f"{n} {t * 1e3:.0f}" for n, t in zip(groups[world], per_round[world][-1], strict=True)
                ),
                flush=True,
            )
    if args.profile:
        device = get_device(args.profile)
    else:
        device = merge_profiles(profiles)
        path = Path(tempfile.mkdtemp()) / "cpu.json"
        device.save(path)
        print(f"calibrated {rounds} times, median profile: {path}")
    spec = ModelSpec.from_any(shape)
    rows = []
    for world in worlds:
        for i, name in enumerate(groups[world]):
            layout = _layout(LAYOUTS[name][1], BATCH)
            plan = evaluate(spec, layout, device, world, BATCH, shape["block_size"], "32-true")
            times = [r[i] for r in per_round[world]]  # the slowest rank's step, per round
            predicted, slowest_rank = plan.prediction["step_s"], statistics.median(times)
            rows.append((name, world, predicted, slowest_rank))
            print(
                f"{name:12s} {world} proc  predicted {predicted * 1e3:8.1f} ms  measured {slowest_rank * 1e3:8.1f} ms"
                f"  (rounds: {', '.join(f'{x * 1e3:.0f}' for x in times)}; predicted compute "
                f"{plan.prediction['compute_s'] * 1e3:.0f}, exposed comm {plan.prediction['comm_exposed_s'] * 1e3:.0f}, "
                f"bubble {plan.prediction['bubble_s'] * 1e3:.0f} ms)"
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
    rho = spearman([r[2] for r in rows], [r[3] for r in rows])
    summary["all"] = rho
    worst = max(abs(r[2] / r[3] - 1) for r in rows)
    print(f"spearman (all {len(rows)} layouts): {rho:.3f}; largest |predicted / measured - 1|: {worst:.1%}")
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
