"""The cost model's step time of one layout, from the same quantities the code runs.

Time: matmul FLOPs (attention projections ``4 h^2``, Llama ``2 h^2 + 2 h n_kv d`` with the kv rows a rank
multiplies; MLP ``2 h F``, SwiGLU ``3 h F`` of the padded width; forward, 2x backward, and with full
recomputation the forward again, which in a dense block stops before its last linear: that linear's input is
the last tensor it saves, ``ModelSpec.recompute_stops_early``) at the device's achievable matmul rate,
attention at its own rate, element-wise work as memory traffic (five passes over the saved bytes: written
and read in forward, read and gradients in backward), AdamW's step as memory traffic (32 bytes per stepped
element), the schedule's bubble (``(p - 1) / (v m)`` of the pipeline's busy time with equal stages; with
unequal ones the other ranks' one pass each, over ``v``), and the collectives each layout issues with their
sizes: tp all-reduces (sequence parallel: reduce-scatter / all-gather) per block half in forward and
backward (again in a full recompute, but for a dense block's last), of which the backward input-gradient
reduction hides behind the weight-gradient matmul; ep all-to-alls there and back in
forward and backward; pp activations and gradients per micro-batch and stage; dp gradient all-reduce
(distributed optimizer: reduce-scatter and, after the step, all-gather) hidden behind the last
micro-batch's backward except its last bucket.

On a CPU profile (``--calibrate``) three more rules hold, each measured on this machine: nothing hides
behind compute (gloo's transfers and sums take the same cores, ``comm_overlap=False``); with more ranks
than cores the step is the longer of the critical path and all ranks' work spread over the cores (a rank
idle in the bubble or a wait gives its core away), with collectives measured at that oversubscription,
and each tp, ep or pp collective issued between stretches of compute waits for its partner's turn on a
core; and with one rank per core too, each such collective costs more than one back to back (the
partner arriving later, a rank waking in its receive). Both waits are measured after 1 and 4 ms of
compute (``DeviceSpec.wait``), the stretch here being the compute of the block half, or of the stage,
per collective it issues; and the framework's own time per step and
per pipeline micro-batch pass, measured on a tiny model, is added (``step_overhead``,
``action_overhead``: 0 on GPU presets).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from lightning_par.planner.cost import (
    PRECISIONS,
    Layout,
    Shard,
    _stage_split,
    attn_activations,
    head_activations,
    mlp_activations,
    rank_stages,
    shard_of,
)
from lightning_par.planner.devices import DeviceSpec, Link
from lightning_par.planner.model import ModelSpec

BUCKET_BYTES = 25 * 2**20  # gradient_bucket_mb=25
ADAMW_BYTES_PER_ELEMENT = 32  # reads p, g, m, v and writes p, m, v (fp32), plus the norm's read of g
OPS = {"attn": 40, "mlp": 30, "moe": 150, "head": 40}
"""Tensor ops per block half and micro-batch, forward and backward (autograd nodes and their kernels, as
this code's halves issue them: layer norm, linears, attention, reshapes, GELU, adds; a MoE half adds the
router, sorting, gathers and per-expert linears), what the host pays ``op_overhead`` for."""


def _link(device: DeviceSpec, span: int, devices_per_node: int, world: int = 1, size: int = 0) -> Link:
    """Ranks ``span`` apart in the mesh are in one node when the group fits in it; with more ranks than
    cores, the collectives measured so for a group of ``size`` (``DeviceSpec.oversubscribed``)."""
    slots = device.compute_slots
    if device.oversubscribed is not None and slots is not None and world > slots:
        if size == 2 and device.oversubscribed_pairs is not None:
            return device.oversubscribed_pairs
        return device.oversubscribed
    return device.intra_node if span <= devices_per_node else device.inter_node


@dataclass(frozen=True)
class _Rates:
    """Per-rank throughputs and the links a stage's collectives use (hashable: stage times are cached)."""

    matmul: float
    attention: float
    memory: float
    op: float
    tp_link: Link
    ep_link: Link
    overlap: bool = True
    """Collectives run beside compute (``DeviceSpec.comm_overlap``)."""
    device: DeviceSpec | None = None
    """The device whose :meth:`DeviceSpec.wait` gives the latency of a collective issued between
    stretches of compute (tp, ep, pp)."""
    oversubscribed: bool = False
    """More ranks than slots (the device's ``oversubscribed_interleaved`` waits)."""

    def time(self, link: Link, op: str, nbytes: float, n: int, compute: float) -> float:
        """Seconds of one collective issued after ``compute`` seconds of this rank's compute."""
        wait = self.device.wait(op, compute, self.oversubscribed) if self.device else 0.0
        return link.time(op, nbytes, n, wait)


def _stage_time(
    spec: ModelSpec,
    pieces: tuple[tuple[int, str], ...],
    shard: Shard,
    n: int,
    seq_len: int,
    ab: int,
    recompute: bool,
    first: bool,
    last: bool,
    rates: _Rates,
) -> tuple[float, float, int]:
    """(compute seconds, exposed tp and ep seconds, collectives issued) of one micro-batch through one
    stage."""
    h, t, f = spec.n_embd, shard.tp, spec.ffn
    # Per token and rank: the column linears (q/k/v; Llama: q, the kv rows it multiplies) and all of the
    # attention projections; an MLP's column linears (GELU fc; SwiGLU gate and up) and all of it.
    kv = spec.kv_rows(t)[1] * h if spec.llama else 2 * h * h / t
    attn_col, attn_all = h * h / t + kv, 2 * h * h / t + kv
    mlp_col = (2 if spec.llama else 1) * h * f / t
    mlp_all = mlp_col + h * f / t
    k, e = spec.moe_top_k, spec.num_experts
    tp, ep = rates.tp_link, rates.ep_link
    passes = 4.0 if recompute else 3.0  # forward, backward (2x), forward again
    sp = shard.sequence_parallel
    held = set(pieces)

    calls = 0  # collectives issued between compute per micro-batch (the stretches between them: rates.time)

    def tp_comm(tokens: float, wgrad_s: float, again: bool, spent: float) -> float:
        """Exposed tp seconds of one block half (forward, backward, and the forward again if ``again``)
        whose compute took ``spent`` seconds."""
        nonlocal calls
        if t == 1:
            return 0.0
        size = ab * tokens * h
        n_calls = (2 if sp else 1) * (3 if again else 2)
        calls += n_calls

        def one(op: str) -> float:
            return rates.time(tp, op, size, t, spent / n_calls)

        if sp:
            fwd = one("all_gather") + one("reduce_scatter")
            hidden, bwd = one("reduce_scatter"), one("all_gather")
        else:
            fwd, hidden, bwd = one("all_reduce"), one("all_reduce"), 0.0
        return fwd * (2 if again else 1) + bwd + (max(0.0, hidden - wgrad_s) if rates.overlap else hidden)

    compute = exposed = 0.0
    for layer, half in pieces:
        before = compute
        # A recomputed region (a block, or the half of one a stage holds) stops after its last saved
        # tensor, the input of its last (row-parallel) linear: that matmul and its reduction are not run
        # again. A MoE half's combine keeps the experts' outputs, so all of it runs again.
        ends = half == "mlp" or (layer, "mlp") not in held
        skip = recompute and ends and spec.recompute_stops_early and layer not in spec.moe_layers
        moe = layer in spec.moe_layers
        if half == "attn":
            act = attn_activations(spec, n, shard, ab)
            again = attn_col if skip else attn_all  # (the out-projection is the rest)
            compute += (3 * attn_all + (again if recompute else 0.0)) * 2 * n / rates.matmul
            compute += passes * (4 * n * seq_len * h / t) / rates.attention
        elif moe:
            act = mlp_activations(spec, layer, n, shard, ab)
            compute += passes * (2 * n * h * e + 2 * n * k * mlp_all) / rates.matmul
        else:
            act = mlp_activations(spec, layer, n, shard, ab)
            again = mlp_col if skip else mlp_all
            compute += (3 * mlp_all + (again if recompute else 0.0)) * 2 * n / rates.matmul
        compute += (5 + (2 if recompute else 0)) * act / rates.memory
        compute += OPS["attn" if half == "attn" else "moe" if moe else "mlp"] * passes / 3 * rates.op
        spent = compute - before
        if half == "attn":
            exposed += tp_comm(n, (2 * n * attn_col) / rates.matmul, recompute and not skip, spent)
        elif moe:
            exposed += tp_comm(n * k, (2 * n * k * mlp_col) / rates.matmul, recompute, spent)
            if shard.ep > 1:  # tokens there and back, forward and backward, and the counts
                calls += 6
                exposed += 4 * rates.time(ep, "all_to_all", ab * n * k * h, shard.ep, spent / 6)
                exposed += 2 * rates.time(ep, "all_to_all", 8 * e, shard.ep, spent / 6)
        else:
            exposed += tp_comm(n, (2 * n * mlp_col) / rates.matmul, recompute and not skip, spent)
    if last:
        before = compute
        compute += 3 * (2 * n * spec.padded_vocab(t) * h / t) / rates.matmul
        compute += 5 * head_activations(spec, n, shard, ab) / rates.memory + OPS["head"] * rates.op
        if t > 1:
            spent, calls = (compute - before) / 3, calls + 3
            exposed += rates.time(tp, "all_reduce", ab * n * h, t, spent)
            exposed += 2 * rates.time(tp, "all_gather", 8 * n, t, spent)
    if first and t > 1:
        calls += 1
        exposed += rates.time(tp, "reduce_scatter" if sp else "all_reduce", ab * n * h, t, 0.0)
    return compute, exposed, calls


@lru_cache(maxsize=4096)
def _stage_times(
    spec: ModelSpec,
    num_stages: int,
    shard: Shard,
    n: int,
    seq_len: int,
    ab: int,
    recompute: bool,
    rates: _Rates,
) -> tuple[tuple[float, float, int], ...]:
    """:func:`_stage_time` of every global stage (cached across layouts that share them)."""
    stages = _stage_split(spec, num_stages, shard.tp)
    last = len(stages) - 1
    return tuple(
        _stage_time(spec, stages[s], shard, n, seq_len, ab, recompute, s == 0, s == last, rates)
        for s in range(len(stages))
    )


def predict_time(
    spec: ModelSpec,
    layout: Layout,
    seq_len: int,
    precision: str,
    device: DeviceSpec,
    devices_per_node: int,
    memory: list[dict[str, float]],
) -> dict[str, float]:
    """Seconds of one optimizer step, split into compute, exposed communication and bubble."""
    pb, _, ab = PRECISIONS[precision]
    t, p, m, v = layout.tp, layout.pp, layout.num_microbatches, layout.virtual
    n = layout.micro_batch_size * seq_len
    # Mesh spans: tp innermost, then dp (ep inside it), then pp.
    world = layout.world_size
    dp_link = _link(device, t * layout.dp, devices_per_node, world, layout.dp)
    ep_link = _link(device, t * layout.ep, devices_per_node, world, layout.ep)
    pp_link = _link(device, t * layout.dp * p, devices_per_node, world, 2)
    slots = device.compute_slots
    rates = _Rates(
        device.matmul_flops,
        device.peak_flops * device.attention_efficiency,
        device.memory_bandwidth * device.memory_efficiency,
        device.op_overhead,
        _link(device, t, devices_per_node, world, t),
        ep_link,
        device.comm_overlap,
        device,
        slots is not None and world > slots,
    )
    recompute = layout.recompute == "full"
    shard = shard_of(layout)
    table = _stage_times(spec, p * v, shard, n, seq_len, ab, recompute, rates)
    rank_compute, rank_exposed, rank_calls = [], [], []
    for mine in rank_stages(layout):
        times = [table[s] for s in mine]
        rank_compute.append(sum(c for c, _, _ in times))
        rank_exposed.append(sum(x for _, x, _ in times))
        rank_calls.append(sum(k for _, _, k in times) + 2 * len(mine))  # (and its two pp transfers)
    busy = m * max(rank_compute)
    # The busiest rank works m micro-batches; the bubble is the other ranks' one pass each before and after
    # it (a flow shop's makespan), split v ways when interleaved: (p - 1) / (v m) of the busy time when
    # the stages are equal, less when the head or embedding make one stage the slowest.
    bubble = (sum(rank_compute) - max(rank_compute)) / v if p > 1 else 0.0
    exposed = m * max(rank_exposed)
    if p > 1:  # activations forward and gradients back, per micro-batch and stage, on the critical path
        act_bytes = ab * n * spec.n_embd / (t if shard.sequence_parallel else 1)
        r = max(
            range(len(rank_compute)), key=rank_compute.__getitem__
        )  # (the stretch between the busiest rank's calls)
        exposed += (
            2 * (v * m + p - 1) * rates.time(pp_link, "p2p", act_bytes, 2, rank_compute[r] / rank_calls[r])
        )
    # Data-parallel gradients (hidden behind the last micro-batch's backward but for the last bucket)
    # and the optimizer step, on the busiest rank.
    dp_exposed = optimizer = 0.0
    # Per pipeline rank: the optimizer step, the framework's step and pipeline-pass times.
    per_rank_fixed: list[float] = []
    passes = 2 * v * m if p > 1 else 0  # forward and backward of each micro-batch and stage
    edp = layout.dp // layout.ep
    for r, mem in enumerate(memory):
        dense = (mem["elements"] - mem["expert_elements"]) * pb
        expert = mem["expert_elements"] * pb
        if layout.distributed_optimizer and layout.dp > 1:
            comm = dp_link.time("reduce_scatter", dense, layout.dp) + ep_link.time(
                "reduce_scatter", expert, edp
            )
            gather = dp_link.time("all_gather", dense, layout.dp) + ep_link.time("all_gather", expert, edp)
            stepped = (dense / layout.dp + expert / edp) / pb
        else:
            comm = dp_link.time("all_reduce", dense, layout.dp) + ep_link.time("all_reduce", expert, edp)
            gather, stepped = 0.0, mem["elements"]
        if layout.dp > 1:
            window = rank_compute[r] * 2 / (4.0 if recompute else 3.0)
            last_bucket = comm * min(1.0, BUCKET_BYTES / (dense + expert))
            hidden = max(last_bucket, comm - window) if rates.overlap else comm
            dp_exposed = max(dp_exposed, hidden + gather)
        adam = ADAMW_BYTES_PER_ELEMENT * stepped / (device.optimizer_bandwidth or rates.memory)
        per_rank_fixed.append(adam + device.step_overhead + passes * device.action_overhead)
        optimizer = max(optimizer, adam)
    comm_exposed = exposed + dp_exposed
    step = busy + max(per_rank_fixed) + bubble + comm_exposed
    # More ranks than cores: the cores are shared. A rank idle in the bubble or a wait leaves its core to
    # another, so the step is the longer of the critical path and all ranks' work spread over the cores.
    if slots is not None and layout.world_size > slots:
        ranks_per_stage = layout.world_size // p
        work = ranks_per_stage * sum(m * c + f for c, f in zip(rank_compute, per_rank_fixed, strict=True))
        shared = work / slots + comm_exposed
        if shared > step:
            busy, optimizer, bubble, step = shared - comm_exposed, 0.0, 0.0, shared
    return {
        "step_s": step,
        "compute_s": step - bubble - comm_exposed,
        "optimizer_s": optimizer,
        "comm_exposed_s": comm_exposed,
        "dp_comm_exposed_s": dp_exposed,
        "bubble_s": bubble,
        "per_microbatch_s": max(rank_compute),
    }
