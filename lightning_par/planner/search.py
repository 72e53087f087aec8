"""The search: every layout the strategy can run on the mesh, priced by the cost model, best first.

:func:`choose_layout` is what ``HybridParallelStrategy(layout="auto")`` calls; :func:`plan_layouts` gives
the ranked list the ``lightning-par plan`` command prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning_par.pipeline.schedules import check_schedule
from lightning_par.planner.cost import PRECISIONS, Layout, bubble_fraction, predict_memory
from lightning_par.planner.devices import DeviceSpec, get_device
from lightning_par.planner.model import ModelSpec
from lightning_par.planner.steptime import predict_time

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zbv")
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


class NoLayoutFits(ValueError):
    """No layout fits the device's memory; the message says the smallest need and what to change."""


@dataclass(frozen=True)
class Plan:
    """A layout with its prediction; :meth:`strategy_kwargs` are ``HybridParallelStrategy``'s arguments."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    expert_parallel_size: int
    sequence_parallel: bool
    pipeline_schedule: str
    virtual_pipeline_size: int | None
    num_microbatches: int | None
    distributed_optimizer: bool
    activation_checkpointing: str | None
    micro_batch_size: int
    accumulate_grad_batches: int
    """Trainer's gradient accumulation (pp = 1); under pp the micro-batches are ``num_microbatches``."""
    prediction: dict[str, Any] = field(default_factory=dict)
    """Bytes per rank (``memory``: MemoryReport's keys, the largest over ranks; ``memory_per_pp_rank``),
    seconds (``step_s``, ``compute_s``, ``comm_exposed_s``, ``bubble_s``), ``tokens_per_s``, ``mfu``,
    ``fits``."""

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`lightning_par.HybridParallelStrategy` for this plan."""
        return {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "expert_parallel_size": self.expert_parallel_size,
            "sequence_parallel": self.sequence_parallel,
            "pipeline_schedule": self.pipeline_schedule,
            "virtual_pipeline_size": self.virtual_pipeline_size,
            "num_microbatches": self.num_microbatches,
            "distributed_optimizer": self.distributed_optimizer,
            "activation_checkpointing": self.activation_checkpointing,
        }

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``tp2 pp2 dp1 ep1 sp 1f1b v1 mb2x4 distopt full``."""
        parts = [
            f"tp{self.tensor_parallel_size}",
            f"pp{self.pipeline_parallel_size}",
            f"dp{self.data_parallel_size}",
            f"ep{self.expert_parallel_size}",
        ]
        if self.sequence_parallel:
            parts.append("sp")
        if self.pipeline_parallel_size > 1:
            parts.append(f"{self.pipeline_schedule} v{self.virtual_pipeline_size or 1}")
        count = self.num_microbatches or self.accumulate_grad_batches
        parts.append(f"mb{self.micro_batch_size}x{count}")
        if self.distributed_optimizer:
            parts.append("distopt")
        if self.activation_checkpointing:
            parts.append(self.activation_checkpointing)
        return " ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_mesh(world_size: int, devices_per_node: int) -> None:
    """Refuse, by name, a GPU count that does not make whole nodes."""
    for name, value in (("gpus", world_size), ("gpus_per_node", devices_per_node)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
    if world_size > devices_per_node and world_size % devices_per_node:
        lower = world_size // devices_per_node * devices_per_node
        raise ValueError(
            f"gpus={world_size} cannot form a mesh of nodes of gpus_per_node={devices_per_node}: use at most "
            f"{devices_per_node} or a multiple of it (for example {lower} or {lower + devices_per_node})."
        )


def candidate_layouts(
    spec: ModelSpec, world_size: int, devices_per_node: int, global_batch_size: int, **fixed: Any
) -> list[Layout]:
    """Every layout the strategy accepts for this model and mesh; ``fixed`` pins Layout fields."""
    out = []
    for tp in _divisors(world_size):
        if tp > devices_per_node or spec.tp_error(tp):
            continue
        for pp in _divisors(world_size // tp):
            if pp > spec.n_layer:
                continue
            dp = world_size // tp // pp
            if global_batch_size % dp:
                continue
            per_replica = global_batch_size // dp
            eps = [d for d in _divisors(dp) if spec.num_experts and spec.num_experts % d == 0] or [1]
            for ep in eps:
                for sp in (False, True) if tp > 1 else (False,):
                    for schedule, virtual in _schedules(spec, pp):
                        for micro in MICRO_BATCH_SIZES:
                            if per_replica % micro:
                                continue
                            m = per_replica // micro
                            if pp > 1:
                                try:
                                    check_schedule(schedule, pp, m, virtual if virtual > 1 else None)
                                except ValueError:
                                    continue
                            for distopt in (False, True) if dp > 1 else (False,):
                                for recompute in (None, "full"):
                                    layout = Layout(
                                        tp, pp, dp, ep, sp, schedule, virtual, micro, m, distopt, recompute
                                    )
                                    if all(getattr(layout, k) == v for k, v in fixed.items()):
                                        out.append(layout)
    return out


def _schedules(spec: ModelSpec, pp: int) -> list[tuple[str, int]]:
    if pp == 1:
        return [("1f1b", 1)]
    out: list[tuple[str, int]] = [("1f1b", 1), ("gpipe", 1)]
    for v in (2, 3, 4, 6, 8):
        if spec.n_layer % (pp * v) == 0:
            out.append(("interleaved_1f1b", v))
    if spec.n_layer % (2 * pp) == 0:
        out.append(("zbv", 2))
    return out


def evaluate(
    spec: ModelSpec,
    layout: Layout,
    device: DeviceSpec,
    devices_per_node: int,
    global_batch_size: int,
    seq_len: int,
    precision: str,
) -> Plan:
    """The plan of one layout: its memory per rank, step time, tokens/s and MFU."""
    memory = predict_memory(spec, layout, seq_len, precision)
    time = predict_time(spec, layout, seq_len, precision, device, devices_per_node, memory)
    worst = max(memory, key=lambda r: r["total"])
    tokens = global_batch_size * seq_len
    flops = spec.flops_per_token(seq_len) * tokens
    prediction = {
        **time,
        "memory": {
            k: worst[k]
            for k in (
                "params",
                "grads",
                "optimizer_moments",
                "optimizer_master",
                "optimizer",
                "activations_peak",
                "total",
            )
        },
        "memory_per_pp_rank": memory,
        "fits": worst["total"] <= device.usable_memory,
        "usable_memory": device.usable_memory,
        "tokens_per_s": tokens / time["step_s"],
        "model_flops_per_step": flops,
        "mfu": flops / (time["step_s"] * layout.world_size * device.peak_flops),
        "bubble_fraction": bubble_fraction(layout),
        "device": device.name,
        "precision": precision,
        "global_batch_size": global_batch_size,
        "seq_len": seq_len,
    }
    pp = layout.pp > 1
    return Plan(
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        data_parallel_size=layout.dp,
        expert_parallel_size=layout.ep,
        sequence_parallel=layout.sequence_parallel,
        pipeline_schedule=layout.schedule,
        virtual_pipeline_size=layout.virtual if layout.virtual > 1 else None,
        num_microbatches=layout.num_microbatches if pp else None,
        distributed_optimizer=layout.distributed_optimizer,
        activation_checkpointing=layout.recompute,
        micro_batch_size=layout.micro_batch_size,
        accumulate_grad_batches=1 if pp else layout.num_microbatches,
        prediction=prediction,
    )


def plan_layouts(
    model: Any,
    world_size: int,
    devices_per_node: int,
    device: str | Path | DeviceSpec = "a100-80gb",
    global_batch_size: int | None = None,
    seq_len: int | None = None,
    precision: str | None = None,
    top: int | None = 10,
    only_fitting: bool = True,
    **fixed: Any,
) -> list[Plan]:
    """Layouts ranked by predicted step time (fitting ones only, unless ``only_fitting=False``).

    ``fixed`` pins :class:`~lightning_par.planner.cost.Layout` fields (``tp=8, pp=2, recompute="full"``).
    Raises :class:`NoLayoutFits` with the smallest memory any layout needs when none fits.
    """
    spec = ModelSpec.from_any(model)
    dev = get_device(device)
    check_mesh(world_size, devices_per_node)
    seq = spec.block_size if seq_len is None else seq_len
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError(f"seq_len={seq!r} is not valid: it must be an integer >= 1.")
    if seq > spec.block_size:  # the run needs learned positions for every token: plan with them
        spec = replace(spec, block_size=seq)
    batch = world_size if global_batch_size is None else global_batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"global_batch_size={batch!r} is not valid: it must be an integer >= 1.")
    prec = precision or ("32-true" if dev.compute_slots is not None else "bf16-mixed")
    if prec not in PRECISIONS:
        raise ValueError(f"precision={prec!r} is not valid; valid values: {sorted(PRECISIONS)}.")
    layouts = candidate_layouts(spec, world_size, devices_per_node, batch, **fixed)
    if not layouts:
        raise ValueError(
            f"no layout of {world_size} GPUs suits this model and batch: tp must divide n_head={spec.n_head} "
            f"and fit a node ({devices_per_node}), pp at most n_layer={spec.n_layer}, and dp must divide "
            f"global_batch_size={batch}{f' with {fixed}' if fixed else ''}; valid global batch sizes are "
            f"multiples of the data-parallel size (for example {world_size})."
        )
    plans = [evaluate(spec, lay, dev, devices_per_node, batch, seq, prec) for lay in layouts]
    fitting = [p for p in plans if p.prediction["fits"]]
    if only_fitting and not fitting:
        smallest = min(plans, key=lambda p: p.prediction["memory"]["total"])
        need = smallest.prediction["memory"]["total"]
        gpus = -(-int(world_size * need / dev.usable_memory) // devices_per_node) * devices_per_node
        raise NoLayoutFits(
            f"no layout fits: the smallest needs {need / 2**30:.1f} GiB per GPU ({smallest.describe()}), the "
            f"{dev.name} has {dev.usable_memory / 2**30:.1f} GiB usable. Use more GPUs (about {max(gpus, world_size + 1)}), "
            f"a device with more memory, a shorter seq_len or a smaller model."
        )
    ranked = sorted(
        fitting if only_fitting else plans,
        key=lambda p: (p.prediction["step_s"], p.prediction["memory"]["total"]),
    )
    return ranked if top is None else ranked[:top]


def choose_layout(
    model_config_or_module: Any,
    world_size: int,
    devices_per_node: int,
    device: str | Path | DeviceSpec = "a100-80gb",
    global_batch_size: int | None = None,
    seq_len: int | None = None,
    precision: str | None = None,
    **fixed: Any,
) -> Plan:
    """The fastest layout that fits: what ``Trainer(strategy="auto_parallel")`` runs.

    Args:
        model_config_or_module: a GPT module, ``GPTConfig``, ``ModelSpec``, dict, or YAML / config.json path.
        world_size: processes (GPUs) in the run; devices_per_node: processes per node.
        device: a preset name (``a100-40gb``, ``a100-80gb``, ``h100-80gb``, ``h200``) or a profile path.
        global_batch_size: sequences per optimizer step (default: ``world_size``).
        seq_len: tokens per sequence (default: the model's ``block_size``).
        precision: ``32-true``, ``bf16-mixed`` or ``bf16-true`` (default: bf16-mixed on GPU presets,
            32-true on a calibrated CPU profile).
        fixed: Layout fields to pin (``tp=2``, ``recompute="full"``, ...).
    """
    return plan_layouts(
        model_config_or_module,
        world_size,
        devices_per_node,
        device,
        global_batch_size,
        seq_len,
        precision,
        top=1,
        **fixed,
    )[0]


def explain(first: Plan, second: Plan) -> str:
    """Why ``first`` is predicted faster than ``second``: the components that differ, largest first."""
    a, b = first.prediction, second.prediction
    keys = [
        ("compute_s", "compute"),
        ("comm_exposed_s", "exposed communication"),
        ("bubble_s", "pipeline bubble"),
    ]
    diffs = sorted(((b[k] - a[k], name) for k, name in keys), reverse=True)
    lines = [
        f"{first.describe()} is predicted {b['step_s'] / a['step_s']:.3f}x as fast as {second.describe()} "
        f"({a['step_s'] * 1e3:.1f} ms against {b['step_s'] * 1e3:.1f} ms per step):"
    ]
    for delta, name in diffs:
        if abs(delta) > 1e-12:
            sign = "less" if delta > 0 else "more"
            lines.append(f"  {abs(delta) * 1e3:.2f} ms {sign} {name}")
    ma, mb = a["memory"]["total"], b["memory"]["total"]
    lines.append(f"  memory per GPU {ma / 2**30:.2f} GiB against {mb / 2**30:.2f} GiB")
    return "\n".join(lines)
