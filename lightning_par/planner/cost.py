"""The cost model: per-rank bytes and step seconds of one layout, counted as this implementation works.

Memory is predicted in :class:`lightning_par.callbacks.MemoryReport`'s quantities. Parameters are the
local shards each rank builds (column-parallel weights and biases split, row-parallel biases whole, the
padded vocabulary split over tp, learned positions and layer norms whole, ``E / ep`` experts), on the
stages the pipeline really cuts (:func:`lightning_par.pipeline.split.split_layers` on the same half-layer
parameter costs ``plan_stages`` uses). Activations are the tensors autograd saves in this code, per
micro-batch (b sequences of s tokens, N = b s, hidden h, heads a, tp t, ffn F = 4h):

* attention half: the layer norm's input (N h) and statistics (2 N fp32), the q/k/v input (N h), its
  output (3 N h / t: q, k and v are views of it), the attention output and log-sum-exp (N h / t, N a / t;
  the output projection's input is a view of it). Sequence parallel shards the layer norm's input and
  statistics by t, but the column-parallel linear keeps the gathered input (N h);
* MLP half: layer norm (N h, 2 N), the first linear's input (N h), GELU's input and output (2 N F / t);
* MoE half: layer norm, the router's input copy (N h), its fp32 softmax, logits, top-k and sums (2 N E +
  N k + 2 N), the tokens the experts receive (N k h, balanced routing), their GELU's input and output
  (2 N k F / t), the combined outputs before and after weighting (2 N k h) and the weights (N k), four
  int64 index vectors (4 N k); with ep > 1 also the experts' output before the exchange back (N k h) and
  the regrouping index (N k int64);
* Llama (RMSNorm, no biases, kv rows ``w`` a rank multiplies: ``2 n_kv d / t``, or ``2 d`` when kv heads
  are replicated; SwiGLU ``F`` the padded width): each norm keeps its normalized input in fp32 and
  the fp32 rsqrt per row (sharded by t under sequence parallel); attention the column input (N h), q and k
  after rotation and the kv output (N h / t + 1.5 N w; v is a view of it), the SDPA output, the output
  projection's input and the log-sum-exp; the MLP the column input, gate, silu(gate), up and their product
  (4 N F / t; a MoE expert the same per routed token). Parameters: q, proj and gate / up / proj split,
  kv split or whole, norms whole, no position table;
* the first stage's token ids (int64), the last stage's final norm and head input (2 N h) and the loss's
  fp32 log-softmax (N V) or, with tp, the vocabulary-parallel logits (N V / t);
* full recomputation keeps each block's input (and a MoE block's two exchange outputs with ep > 1); in
  backward one block's tensors are refilled at a time.

A rank keeps the activations of the micro-batches in flight: all of them under GPipe, ``p - r`` on pp rank
``r`` under 1F1B, ``(v - 1) p + 2 (p - 1 - r) + 1`` stage passes under the interleaved schedules.

Step time: :mod:`lightning_par.planner.steptime`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from lightning_par.pipeline.schedules import INTERLEAVED, stage_placement, stages_per_rank
from lightning_par.pipeline.split import split_layers
from lightning_par.planner.model import ModelSpec

PRECISIONS = {
    # name: (parameter / gradient bytes, AdamW moment bytes, activation bytes)
    "32-true": (4, 4, 4),
    "bf16-mixed": (4, 4, 2),
    "bf16-true": (2, 2, 2),
}


@dataclass(frozen=True)
class Layout:
    """Every setting a plan chooses (the strategy's arguments and the micro-batch split)."""

    tp: int
    pp: int
    dp: int
    ep: int = 1
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    """Pipeline micro-batches per step (pp > 1), or gradient-accumulation steps (pp = 1)."""
    distributed_optimizer: bool = False
    recompute: str | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the stage split ------------------------------------------------------------------------------------
def _piece_params(spec: ModelSpec, layer: int, half: str, tp: int, ep: int) -> tuple[int, int, int]:
    """(local elements, local tensors, of them expert elements) of one half block on one rank."""
    h, b, t = spec.n_embd, int(spec.bias), tp
    norm = spec.norm_params
    norm_tensors = 1 + b
    if spec.llama:  # q, kv (split or replicated), proj; SwiGLU gate and up by rows, proj by columns
        if half == "attn":
            return norm + 2 * h * h // t + spec.kv_rows(t)[0] * h, norm_tensors + 3, 0
        mlp, mlp_tensors = 3 * h * spec.ffn // t, 3
    else:
        if half == "attn":
            return norm + (3 * h * h + 3 * h * b) // t + h * h // t + h * b, norm_tensors + 2 + 2 * b, 0
        mlp, mlp_tensors = (4 * h * h + 4 * h * b) // t + 4 * h * h // t + h * b, 2 + 2 * b
    if layer in spec.moe_layers:
        experts = spec.num_experts // ep
        return (
            norm + spec.num_experts * h + experts * mlp,
            norm_tensors + 1 + experts * mlp_tensors,
            experts * mlp,
        )
    return norm + mlp, norm_tensors + mlp_tensors, 0


def stage_split(spec: ModelSpec, layout: Layout) -> tuple[tuple[tuple[int, str], ...], ...]:
    """The (layer, half) pieces of every global stage, as ``plan_stages`` cuts the meta network."""
    return _stage_split(spec, layout.pp * layout.virtual, layout.tp)


@lru_cache(maxsize=256)
def _stage_split(spec: ModelSpec, stages: int, tp: int) -> tuple[tuple[tuple[int, str], ...], ...]:
    pieces = [(i, half) for i in range(spec.n_layer) for half in ("attn", "mlp")]
    if stages == 1:
        return (tuple(pieces),)
    # plan_stages counts the unsharded meta network's parameters (vocabulary padded for tp).
    costs = [float(_piece_params(spec, i, half, 1, 1)[0]) for i, half in pieces]
    last = float(spec.norm_params + spec.padded_vocab(tp) * spec.n_embd)
    if stages * len(pieces) ** 2 <= 200_000:
        split = split_layers(costs, stages, 0.0, last)
    else:
        split = _bisect_split(costs, stages, last)
    return tuple(tuple(pieces[j] for j in idx) for idx in split)


def _bisect_split(costs: list[float], stages: int, last: float) -> list[list[int]]:
    """The same smallest maximum stage cost as ``split_layers`` (which is quadratic in the pieces: too slow
    for hundreds of stages), by bisection on that maximum with a greedy fill; ties may cut elsewhere."""
    n = len(costs)

    def fill(limit: float) -> list[list[int]] | None:
        out: list[list[int]] = [[] for _ in range(stages)]
        s, total = stages - 1, last
        for j in range(n - 1, -1, -1):  # from the end: the last stage carries the head
            must_cut = j + 1 == s  # every earlier stage still needs one piece
            if out[s] and (total + costs[j] > limit or must_cut) and s > 0:
                s, total = s - 1, 0.0
            if total + costs[j] > limit:
                return None
            out[s].insert(0, j)
            total += costs[j]
        return out if s == 0 and all(out) else None

    lo, hi = max(max(costs), last), sum(costs) + last
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    found = fill(hi)
    assert found is not None
    return found


def rank_stages(layout: Layout) -> list[list[int]]:
    """The global stages of every pp rank (looped, or V-shaped under ZBV)."""
    schedule = layout.schedule if layout.pp > 1 else "1f1b"
    return stage_placement(schedule, layout.pp, layout.virtual if layout.virtual > 1 else None)


# ---- memory ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """What the per-rank sizes of a piece depend on."""

    tp: int
    ep: int
    sequence_parallel: bool


def shard_of(layout: Layout) -> Shard:
    """The sharding of a layout (sequence parallel only counts with tp > 1, as ``ParallelLayout``)."""
    return Shard(layout.tp, layout.ep, layout.sequence_parallel and layout.tp > 1)


def attn_activations(spec: ModelSpec, n: int, layout: Shard, ab: int) -> float:
    """Bytes an attention half saves for ``n`` tokens (see the module docstring)."""
    h, a, t = spec.n_embd, spec.n_head, layout.tp
    sp = layout.sequence_parallel
    if spec.llama:  # q and k after rotation, the kv output (v is a view of it), the rows it multiplies
        kv = spec.kv_rows(t)[1]
        saved = n * h + n * h / t + 1.5 * n * kv + 2 * n * h / t
        return _rms_norm(spec, n, layout) + ab * saved + 4 * n * a / t
    ln_in = n * h / t if sp else n * h
    stats = 2 * n / t if sp else 2 * n
    return ab * (ln_in + n * h + 4 * n * h / t) + 4 * (stats + n * a / t)


def _rms_norm(spec: ModelSpec, n: int, layout: Shard) -> float:
    """Bytes Llama's RMSNorm saves: the normalized input in fp32 and the fp32 rsqrt per row."""
    rows = n / layout.tp if layout.sequence_parallel else n
    return 4 * rows * spec.n_embd + 4 * rows


def mlp_activations(spec: ModelSpec, layer: int, n: int, layout: Shard, ab: int) -> float:
    """Bytes a dense or MoE MLP half saves for ``n`` tokens (see the module docstring)."""
    h, t = spec.n_embd, layout.tp
    f = spec.ffn
    hidden = 4 if spec.llama else 2  # SwiGLU: gate, silu(gate), up, their product; GELU: input, output
    sp = layout.sequence_parallel
    ln_in = n * h / t if sp else n * h
    stats = 2 * n / t if sp else 2 * n
    norm = _rms_norm(spec, n, layout) if spec.llama else ab * ln_in + 4 * stats
    if layer not in spec.moe_layers:
        if spec.llama:
            return norm + ab * (n * h + hidden * n * f / t)
        return ab * (ln_in + n * h + 2 * n * f / t) + 4 * stats
    e, k = spec.num_experts, spec.moe_top_k
    nk = n * k
    router = 4 * (2 * n * e + nk + 2 * n)
    exchanged = nk * h if layout.ep > 1 else 0  # the experts' output before the exchange back
    tokens = ab * (n * h + nk * h + hidden * nk * f / t + 2 * nk * h + nk + exchanged)
    index = 8 * (4 * nk + (nk if layout.ep > 1 else 0))
    return norm + router + tokens + index


def _block_input(spec: ModelSpec, n: int, layout: Shard, ab: int) -> float:
    return ab * n * spec.n_embd / (layout.tp if layout.sequence_parallel else 1)


def head_activations(spec: ModelSpec, n: int, layout: Shard, ab: int) -> float:
    """Bytes the final norm, head and loss save for ``n`` tokens."""
    h, t = spec.n_embd, layout.tp
    sp = layout.sequence_parallel
    if spec.llama:
        norm = _rms_norm(spec, n, layout)
    else:
        norm = (ab * n * h / t + 4 * 2 * n / t) if sp else (ab * n * h + 4 * 2 * n)
    head_in = ab * n * h
    if t == 1:
        loss = 4 * n * spec.vocab_size + 8 * n + n
    else:
        loss = 4 * n * spec.padded_vocab(t) / t + 4 * n + 8 * n + 2 * n
    return norm + head_in + loss


def _embed_act(n: int, layout: Shard) -> float:
    return 8 * n + (8 * n + n if layout.tp > 1 else 0)


def _in_flight(layout: Layout, rank: int) -> int:
    """Stage passes (one stage, one micro-batch) whose activations rank ``rank`` holds at its peak."""
    p, m, v = layout.pp, layout.num_microbatches, layout.virtual
    if p == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    if layout.schedule == "1f1b":
        return min(m, p - rank)
    return min(m * v, (v - 1) * p + 2 * (p - 1 - rank) + 1)


def _stage(
    spec: ModelSpec,
    pieces: tuple[tuple[int, str], ...],
    shard: Shard,
    n: int,
    ab: int,
    full: bool,
    first: bool,
    last: bool,
) -> tuple[int, int, int, float, float, float]:
    """One stage on one rank: (elements, tensors, expert elements, activations kept per micro-batch,
    largest refill of a recomputed block, the head's activations)."""
    elements = tensors = expert_elements = 0
    blocks: dict[int, float] = {}
    for layer, half in pieces:
        e, k, x = _piece_params(spec, layer, half, shard.tp, shard.ep)
        elements, tensors, expert_elements = elements + e, tensors + k, expert_elements + x
        act = (
            attn_activations(spec, n, shard, ab)
            if half == "attn"
            else mlp_activations(spec, layer, n, shard, ab)
        )
        blocks[layer] = blocks.get(layer, 0.0) + act
    kept = _embed_act(n, shard) if first else 0.0
    head = head_activations(spec, n, shard, ab) if last else 0.0
    kept += head
    refill = 0.0
    if full:
        x = _block_input(spec, n, shard, ab)
        exchange = sum(
            2 * ab * n * spec.moe_top_k * spec.n_embd for b in blocks if b in spec.moe_layers and shard.ep > 1
        )
        kept += x * len(blocks) + exchange
        refill = max([0.0, *(a - x for a in blocks.values())])
    else:
        kept += sum(blocks.values())
    return elements, tensors, expert_elements, kept, refill, head


@lru_cache(maxsize=4096)
def stage_table(
    spec: ModelSpec, num_stages: int, shard: Shard, n: int, ab: int, full: bool
) -> tuple[tuple[int, int, int, float, float, float], ...]:
    """:func:`_stage` for every global stage (cached: layouts differing in dp, schedule or optimizer share it)."""
    stages = _stage_split(spec, num_stages, shard.tp)
    last = len(stages) - 1
    return tuple(_stage(spec, stages[s], shard, n, ab, full, s == 0, s == last) for s in range(len(stages)))


def predict_memory(spec: ModelSpec, layout: Layout, seq_len: int, precision: str) -> list[dict[str, float]]:
    """Per pp rank (any dp / tp position: they hold the same), MemoryReport's figures in bytes."""
    pb, mb, ab = PRECISIONS[precision]
    n = layout.micro_batch_size * seq_len
    h, t = spec.n_embd, layout.tp
    shard = shard_of(layout)
    full = layout.recompute == "full"
    table = stage_table(spec, layout.pp * layout.virtual, shard, n, ab, full)
    last = len(table) - 1
    vocab_local = spec.padded_vocab(t) * h // t
    out = []
    for rank, mine in enumerate(rank_stages(layout)):
        elements = tensors = expert_elements = 0
        kept, refill, head = [], 0.0, 0.0
        for s in mine:
            e, k, x, act, fill, hd = table[s]
            elements, tensors, expert_elements = elements + e, tensors + k, expert_elements + x
            kept.append(act)
            refill, head = max(refill, fill), max(head, hd)
        has_first, has_last = 0 in mine, last in mine
        if has_first:
            elements += vocab_local + spec.position_params
            tensors += 1 + int(spec.position_params > 0)
        if has_last:
            elements += spec.norm_params
            tensors += 1 + int(spec.bias)
            if not (spec.tie_embeddings and has_first):
                elements += vocab_local
                tensors += 1
        dense = elements - expert_elements
        params = pb * elements
        if layout.distributed_optimizer and layout.dp > 1:
            edp = layout.dp // layout.ep
            stepped = dense / layout.dp + expert_elements / edp
            moments = 8 * stepped + 4 * (tensors / layout.dp + 2)
            master = 4 * stepped if pb == 2 else 0.0
        else:
            moments = 2 * mb * elements + 4 * tensors
            master = 0.0
        # The micro-batches (stage passes) in flight each keep their stage's activations; a recomputed
        # block refills its tensors in backward, after the head's were freed.
        peak = _in_flight(layout, rank) * sum(kept) / len(kept)
        if full:
            peak += max(0.0, refill - head)
        out.append(
            {
                "params": params,
                "grads": params,
                "optimizer_moments": moments,
                "optimizer_master": master,
                "optimizer": moments + master,
                "activations_peak": peak,
                "total": 2 * params + moments + master + peak,
                "elements": elements,
                "expert_elements": expert_elements,
            }
        )
    return out


def bubble_fraction(layout: Layout) -> float:
    """The repo's bubble theory, (p - 1) / (v m + p - 1); zero-bubble schedules use it with v = 2 too."""
    p, m = layout.pp, layout.num_microbatches
    v = stages_per_rank(layout.schedule, layout.virtual) if layout.schedule in (*INTERLEAVED, "zbv") else 1
    return (p - 1) / (v * m + p - 1) if p > 1 else 0.0
