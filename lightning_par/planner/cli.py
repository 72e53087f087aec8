"""``lightning-par plan``: the best layouts for a model on a cluster, as a table, JSON, or with reasons."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lightning_par.planner.devices import PRESETS
from lightning_par.planner.model import ModelSpec
from lightning_par.planner.search import NoLayoutFits, Plan, explain, plan_layouts

GIB = 2**30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-par plan",
        description="Rank the tensor / pipeline / expert / data-parallel layouts of a model on a cluster by "
        "predicted step time, with per-GPU memory (params, grads, optimizer, activations).",
    )
    src = parser.add_argument_group("model (one of)")
    src.add_argument("--config", help="a `lightning-par fit` YAML config (its model.init_args)")
    src.add_argument("--hf-config", help="a Hugging Face config.json (or its directory)")
    for name in ("n-layer", "n-embd", "n-head", "vocab-size", "block-size", "num-experts", "moe-top-k"):
        src.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (processes) in the run")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--gpu",
        default="a100-80gb",
        help=f"a preset ({', '.join(sorted(PRESETS))}) or a profile .json from --calibrate",
    )
    parser.add_argument(
        "--global-batch-size", type=int, default=None, help="sequences per step (default: --gpus)"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: block_size)")
    parser.add_argument("--precision", default=None, choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--top", type=int, default=10, help="how many layouts to show")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    parser.add_argument("--explain", action="store_true", help="say why the first layout beats the second")
    parser.add_argument(
        "--calibrate",
        metavar="PROFILE.json",
        default=None,
        help="measure this machine (matmul, memory, the backend's collectives) and save a profile",
    )
    parser.add_argument("--calibrate-processes", type=int, default=2)
    parser.add_argument(
        "--calibrate-repeat", type=int, default=5, help="timed repeats per measurement (median)"
    )
    return parser


def _model(ns: argparse.Namespace) -> ModelSpec:
    flags = {
        "n_layer": ns.n_layer,
        "n_embd": ns.n_embd,
        "n_head": ns.n_head,
        "vocab_size": ns.vocab_size,
        "block_size": ns.block_size,
        "num_experts": ns.num_experts,
        "moe_top_k": ns.moe_top_k,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if ns.config or ns.hf_config:
        base = ModelSpec.from_file(ns.config or ns.hf_config).asdict()
        return ModelSpec.from_dict({**base, **given})
    return ModelSpec.from_dict(given)


def _row(rank: int, plan: Plan) -> list[str]:
    p, mem = plan.prediction, plan.prediction["memory"]
    return [
        str(rank),
        plan.describe(),
        f"{mem['params'] / GIB:.2f}",
        f"{mem['grads'] / GIB:.2f}",
        f"{mem['optimizer'] / GIB:.2f}",
        f"{mem['activations_peak'] / GIB:.2f}",
        f"{mem['total'] / GIB:.2f}",
        f"{p['step_s'] * 1e3:.1f}",
        f"{p['compute_s'] * 1e3:.1f}",
        f"{p['comm_exposed_s'] * 1e3:.1f}",
        f"{p['bubble_s'] * 1e3:.1f}",
        f"{p['tokens_per_s']:,.0f}",
        f"{100 * p['mfu']:.1f}",
    ]


def format_plans(plans: list[Plan]) -> str:
    header = [
        "#",
        "layout (tp pp dp ep [sp] [schedule v] mb<size>x<count> [distopt] [recompute])",
        "params GiB",
        "grads",
        "optim",
        "activ",
        "total",
        "step ms",
        "compute",
        "comm",
        "bubble",
        "tokens/s",
        "MFU %",
    ]
    rows = [_row(i + 1, p) for i, p in enumerate(plans)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _jsonable(plan: Plan) -> dict[str, Any]:
    data = plan.asdict()
    data["layout"] = plan.describe()
    data["strategy_kwargs"] = plan.strategy_kwargs()
    return data


def plan_main(args: list[str]) -> None:
    """Parse ``args`` and print the plans (exit status 2 with the reason for bad input)."""
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.calibrate:
        from lightning_par.planner.calibrate import calibrate

        spec = calibrate(ns.calibrate, world=ns.calibrate_processes, repeat=ns.calibrate_repeat)
        print(
            f"wrote {ns.calibrate}: matmul {spec.peak_flops / 1e9:.1f} GFLOP/s, memory "
            f"{spec.memory_bandwidth / 1e9:.1f} GB/s, all-reduce {spec.intra_node.bandwidth / 1e9:.2f} GB/s "
            f"+ {spec.intra_node.latency * 1e6:.0f} us"
        )
        if ns.gpus is None:
            return
        ns.gpu = ns.calibrate
    if ns.gpus is None:
        parser.error("--gpus is required: the number of GPUs (processes) to plan for.")
    try:
        plans = plan_layouts(
            _model(ns),
            ns.gpus,
            ns.gpus_per_node,
            ns.gpu,
            ns.global_batch_size,
            ns.seq_len,
            ns.precision,
            top=max(ns.top, 2),
        )
    except (NoLayoutFits, ValueError, FileNotFoundError, TypeError) as err:
        parser.error(str(err))
    shown = plans[: ns.top]
    if ns.json:
        out: dict[str, Any] = {"plans": [_jsonable(p) for p in shown]}
        if ns.explain and len(plans) > 1:
            out["explain"] = explain(plans[0], plans[1])
        print(json.dumps(out, indent=2, default=float))
        return
    print(format_plans(shown))
    if ns.explain and len(plans) > 1:
        print()
        print(explain(plans[0], plans[1]))
