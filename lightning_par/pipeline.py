"""Pipeline parallelism: split a protocol model into stages and run torch's pipelining schedules on them.

Where this sits in the flow (``pipeline_parallel_size > 1``):

1. The strategy checks the schedule settings (:func:`check_schedule`) at ``Trainer(...)``.
2. At setup, on the meta device, :func:`split_layers` assigns the model's layers to the global stages
   (balanced by parameter count, the first stage also holding the embedding, the last the final norm,
   head and loss), :func:`stage_placement` says which stages this pp rank runs (looped for plain and
   interleaved schedules, V-shaped for ZBV), and :func:`prune_network` deletes what this rank does not
   own. Parameter names stay global (``layers.7...`` on whichever rank owns layer 7). Blocks that name
   their halves (``PARTS``: attention and MLP) may be cut between them, so a stage can end after the
   attention of a layer and the next begin with its MLP: with whole layers only, the head on the last
   stage leaves the stages unequal (8 layers and a 4096-word head at pp=2: 4 layers against 4.6).
3. Tensor parallel is applied to what is left, exactly as without pipeline.
4. Each step, :class:`PipelineRunner` runs the batch through ``torch.distributed.pipelining``: one
   ``PipelineStage`` per local stage (a view sharing the network's modules) and the named schedule.

What is ours and why (the rest is torch's): stage views over one network, so the LightningModule keeps a
single model with global names; a schedule per batch shape (torch's stages infer shapes on their first
step and keep them, so a validation batch of another length would break a training stage); padding of a
short last batch to whole microbatches with ignored labels (the token-weighted loss does not change);
the loss scaled by the whole batch's token count, and broadcast from the last stage; a forward-only path
for predict that returns the outputs on every rank; and the optional per-stage timeline.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.microbatch import TensorChunkSpec

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
"""Schedule names accepted by ``pipeline_schedule``."""

INTERLEAVED = ("interleaved_1f1b", "interleaved_zero_bubble")
IGNORE_INDEX = -100


def stages_per_rank(schedule: str, virtual_pipeline_size: int | None) -> int:
    """How many pipeline stages each pp rank runs: 1, ``virtual_pipeline_size`` (default 2) or 2 (ZBV)."""
    if schedule in INTERLEAVED:
        return virtual_pipeline_size or 2
    if schedule == "zbv":
        return 2
    return 1


def check_schedule(
    schedule: str, pipeline_parallel_size: int, num_microbatches: int, virtual_pipeline_size: int | None
) -> None:
    """Raise (naming the value and the valid choices) for settings torch's schedules cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline_schedule={schedule!r} is not known; valid choices: {sorted(SCHEDULES)}.")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r} is not valid: it must be an integer >= 1.")
    v = virtual_pipeline_size
    if v is not None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"virtual_pipeline_size={v!r} is not valid: it must be None or an integer >= 1.")
        if schedule == "zbv" and v != 2:
            raise ValueError(
                f"virtual_pipeline_size={v} does not fit pipeline_schedule='zbv', which always runs 2 stages "
                f"per rank (V shape); use virtual_pipeline_size=None or 2."
            )
        if schedule not in (*INTERLEAVED, "zbv") and v != 1:
            raise ValueError(
                f"virtual_pipeline_size={v} needs an interleaved schedule; valid pipeline_schedule values "
                f"with virtual stages: {list(INTERLEAVED)} (or 'zbv', which uses 2)."
            )
    p, m = pipeline_parallel_size, num_microbatches
    if schedule == "1f1b" and m < p:
        raise ValueError(
            f"num_microbatches={m} is fewer than the {p} pipeline stages: 1F1B needs num_microbatches >= "
            f"pipeline_parallel_size ({p}); use more microbatches or pipeline_schedule='gpipe'."
        )
    if schedule in INTERLEAVED:
        rounds = max(1, m // p)
        if m % rounds:
            valid = [k for k in range(p, 4 * p + 1, p)]
            raise ValueError(
                f"num_microbatches={m} does not suit pipeline_schedule={schedule!r} with "
                f"pipeline_parallel_size={p}: it must be a multiple of num_microbatches // {p} "
                f"(for example one of {valid})."
            )


def stage_placement(
    schedule: str, pipeline_parallel_size: int, virtual_pipeline_size: int | None
) -> list[list[int]]:
    """The global stage indices each pp rank runs, in the order torch's schedules expect.

    Looped placement (rank ``r`` runs ``r, r + p, ...``) for single-stage and interleaved schedules; the V
    shape of ZBV (rank ``r`` runs ``r`` and ``2p - 1 - r``), so the first and last stage share rank 0.
    """
    p = pipeline_parallel_size
    v = stages_per_rank(schedule, virtual_pipeline_size)
    if schedule == "zbv":
        return [[r, 2 * p - 1 - r] for r in range(p)]
    return [[r + i * p for i in range(v)] for r in range(p)]


def split_layers(
    layer_costs: Sequence[float],
    num_stages: int,
    first_cost: float = 0.0,
    last_cost: float = 0.0,
    boundaries: Sequence[int] | None = None,
) -> list[list[int]]:
    """Contiguous indices per stage of the pieces (layers, or halves of layers) whose costs are given.

    With ``boundaries`` (the first layer of every stage but the first, increasing) the split is taken as
    given. Otherwise the split minimises the most expensive stage, where a stage costs the sum of its
    pieces plus ``first_cost`` (stage 0: embeddings) or ``last_cost`` (last stage: norm, head, loss).
    Every stage gets at least one piece.
    """
    n = len(layer_costs)
    if num_stages > n:
        raise ValueError(
            f"{num_stages} pipeline stages cannot split {n} layers: every stage needs at least one layer; "
            f"use at most {n} stages (pipeline_parallel_size x virtual stages)."
        )
    if boundaries is not None:
        bounds = list(boundaries)
        ok = (
            len(bounds) == num_stages - 1
            and all(isinstance(b, int) for b in bounds)
            and all(a < b for a, b in zip([0, *bounds], [*bounds, n], strict=True))
        )
        if not ok:
            raise ValueError(
                f"pipeline_stage_boundaries={bounds} is not valid: give {num_stages - 1} increasing layer indices "
                f"in 1..{n - 1} (the first layer of each stage after the first)."
            )
        edges = [0, *bounds, n]
        return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> float:
        extra = (first_cost if stage == 0 else 0.0) + (last_cost if stage == num_stages - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[s][i]: the smallest possible maximum stage cost when stages 0..s-1 hold layers 0..i-1.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = value, j
    edges = [n]
    for s in range(num_stages, 0, -1):
        edges.append(cut[s][edges[-1]])
    edges.reverse()
    return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def network_costs(network: nn.Module) -> tuple[list[float], float, float]:
    """(per-layer cost, first-stage extra, last-stage extra), in parameters that a matmul multiplies.

    Compute per token is about proportional to the matrix parameters a token passes through. Embedding
    lookups cost next to nothing; the head is a matmul over the vocabulary (and the loss reads its output).
    """
    layers = [_numel(layer) for layer in network.layers.values()]
    # The head's parameters: GPT's is one matrix (tied or not), BERT's adds a transform or a pooler.
    last = _numel(getattr(network, "norm", None)) + _numel(getattr(network, "head", None))
    return layers, 0.0, last


def _numel(module: nn.Module | None) -> float:
    return float(sum(p.numel() for p in module.parameters())) if module is not None else 0.0


def block_parts(network: nn.Module) -> dict[str, tuple[str, ...]] | None:
    """The halves a pipeline stage may hold of one of the network's blocks, or ``None`` (whole blocks).

    A block class opts in with ``PARTS = {"attn": ("ln_1", "attn"), "mlp": ("ln_2", "mlp")}`` (its
    halves in forward order, each naming its submodules) and a ``forward`` that skips a half set to None.
    """
    blocks = list(network.layers.values())
    parts = getattr(type(blocks[0]), "PARTS", None) if blocks else None
    if parts is None or any(getattr(type(b), "PARTS", None) != parts for b in blocks):
        return None
    return dict(parts)


@dataclass(frozen=True)
class StagePlan:
    """What one pp rank runs: its global stages and the layers each holds."""

    num_stages: int
    stages: tuple[int, ...]
    layers: dict[int, list[int]]
    """global stage index -> layer indices (whole, or the halves given in ``parts``)."""
    parts: dict[int, dict[int, tuple[str, ...]]] = field(default_factory=dict)
    """global stage index -> {layer index: the halves of it the stage runs}, for layers cut between stages."""
    part_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """half name -> the block's submodules in it (the block's ``PARTS``)."""

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stages

    def owned_layers(self) -> list[int]:
        return sorted({i for s in self.stages for i in self.layers[s]})

    def owned_parts(self) -> dict[int, set[str] | None]:
        """Layer index -> the halves of it this rank holds (``None``: the whole layer)."""
        whole = set(self.part_modules)
        owned: dict[int, set[str]] = {}
        for s in self.stages:
            for i in self.layers[s]:
                owned.setdefault(i, set()).update(self.parts.get(s, {}).get(i, whole))
        return {i: None if halves >= whole else halves for i, halves in owned.items()}

    def keeps(self, name: str) -> bool:
        """Whether this rank keeps parameter ``name`` (relative to the network): what
        :func:`prune_network` leaves in place."""
        parts = name.split(".")
        if parts[0] == "embed":
            return self.has_first
        if parts[0] in ("norm", "head"):
            return self.has_last
        if parts[0] == "layers" and len(parts) > 1:
            owned = self.owned_parts()
            layer = int(parts[1])
            if layer not in owned:
                return False
            halves = owned[layer]
            return halves is None or any(parts[2] in self.part_modules[h] for h in halves)
        return True


def plan_stages(
    network: nn.Module,
    schedule: str,
    pipeline_parallel_size: int,
    pp_rank: int,
    virtual_pipeline_size: int | None,
    boundaries: Sequence[int] | None = None,
) -> StagePlan:
    """Assign layers to stages and stages to this rank (checks the model against the settings)."""
    _check_protocol(network)
    p = pipeline_parallel_size
    v = stages_per_rank(schedule, virtual_pipeline_size)
    num_stages = p * v
    n_layer = len(network.layers)
    if p > n_layer:
        raise ValueError(
            f"pipeline_parallel_size={p} is more than the model's {n_layer} layers; valid values: 1..{n_layer}."
        )
    if v > 1 and n_layer % num_stages:
        valid = [k for k in range(1, n_layer + 1) if n_layer % (p * k) == 0]
        raise ValueError(
            f"virtual_pipeline_size={v} with pipeline_parallel_size={p} makes {num_stages} stages, which do not "
            f"divide the model's {n_layer} layers; valid virtual_pipeline_size here: {valid}."
        )
    costs, first, last = network_costs(network)
    keys = [int(k) for k in network.layers.keys()]
    placement = tuple(stage_placement(schedule, p, virtual_pipeline_size)[pp_rank])
    halves = block_parts(network) if boundaries is None else None
    if halves is None:
        per_stage = split_layers(costs, num_stages, first, last, boundaries)
        layers = {s: [keys[i] for i in idx] for s, idx in enumerate(per_stage)}
        return StagePlan(num_stages=num_stages, stages=placement, layers=layers)
    # The pieces are every layer's halves in forward order, each costing its own parameters.
    blocks = list(network.layers.values())
    pieces = [(n, half) for n in range(len(keys)) for half in halves]
    piece_costs = [sum(_numel(getattr(blocks[n], m, None)) for m in halves[half]) for n, half in pieces]
    layers, parts = {}, {}
    for s, idx in enumerate(split_layers(piece_costs, num_stages, first, last)):
        held: dict[int, list[str]] = {}
        for j in idx:
            n, half = pieces[j]
            held.setdefault(keys[n], []).append(half)
        layers[s] = list(held)
        cut = {i: tuple(h) for i, h in held.items() if len(h) < len(halves)}
        if cut:
            parts[s] = cut
    return StagePlan(num_stages, placement, layers, parts, halves)


def _check_protocol(network: nn.Module) -> None:
    if not isinstance(getattr(network, "layers", None), nn.ModuleDict):
        raise TypeError(
            f"pipeline parallel needs the network ({type(network).__name__}) to keep its blocks in "
            f"`layers: nn.ModuleDict` keyed by global layer index, with optional `embed`, `norm` and `head` "
            f"(see the model protocol in the README)."
        )


def prune_network(network: nn.Module, plan: StagePlan) -> None:
    """Delete every part this rank does not own; shared parameters stay shared among what remains."""
    owned = plan.owned_parts()
    for key in list(network.layers.keys()):
        if int(key) not in owned:
            del network.layers[key]
        elif (halves := owned[int(key)]) is not None:
            _drop_halves(network.layers[key], halves, plan.part_modules)
    if not plan.has_first and getattr(network, "embed", None) is not None:
        network.embed = None
    if not plan.has_last:
        for name in ("norm", "head"):
            if getattr(network, name, None) is not None:
                setattr(network, name, None)


def _drop_halves(block: nn.Module, keep: Collection[str], part_modules: Mapping[str, Sequence[str]]) -> None:
    for half, names in part_modules.items():
        if half not in keep:
            for name in names:
                setattr(block, name, None)


def stage_view(
    network: nn.Module,
    layers: Sequence[int],
    first: bool,
    last: bool,
    parts: Mapping[int, Sequence[str]] | None = None,
    part_modules: Mapping[str, Sequence[str]] | None = None,
) -> nn.Module:
    """A shallow copy of ``network`` that runs only ``layers`` (plus embed / norm and head at the ends).

    The view shares every submodule and parameter with ``network``; its ``forward`` is the network's own,
    which skips the parts that are absent (the model protocol). A layer listed in ``parts`` becomes a
    view of its block with only those halves (``part_modules`` names their submodules).
    """
    view = copy.copy(network)
    view._modules = dict(network._modules)
    blocks = {}
    for i in layers:
        block = network.layers[str(i)]
        if parts and i in parts:
            block = copy.copy(block)
            block._modules = dict(block._modules)
            _drop_halves(block, parts[i], part_modules or {})
        blocks[str(i)] = block
    view.layers = nn.ModuleDict(blocks)
    if not first:
        view.embed = None
    if not last:
        view.norm = None
        view.head = None
    return view


def plan_views(network: nn.Module, plan: StagePlan) -> dict[int, nn.Module]:
    """A :func:`stage_view` of the (pruned) network for each of this rank's stages."""
    last = plan.num_stages - 1
    return {
        s: stage_view(network, plan.layers[s], s == 0, s == last, plan.parts.get(s), plan.part_modules)
        for s in plan.stages
    }


# ---- running a schedule ------------------------------------------------------------------------------
@dataclass
class TimelineEvent:
    kind: str  # "F", "B" (full or input backward), "W" (weight backward)
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class _Entry:
    stages: list[PipelineStage]
    schedule: Any
    events: list[TimelineEvent] = field(default_factory=list)


class PipelineRunner:
    """Runs whole batches through this rank's stages with one of torch's schedules.

    Args:
        network: the (pruned) network; its ``loss_fn(output, labels) -> (loss_sum, num_tokens)`` gives the
            loss on the last stage, and ``count_loss_tokens(labels)`` (optional) the number of tokens it
            counts, so every microbatch's loss can be divided by the whole batch's count.
        plan: this rank's stages.
        schedule: a name from :data:`SCHEDULES`.
        num_microbatches: microbatches per batch.
        group: the pipeline process group (ranks that hold the other stages of this model replica).
        loss_group: a second group over the same ranks. The last stage broadcasts the batch's loss on it
            as soon as its last microbatch's loss is known, in the background, rather than in a collective
            after the schedule: ranks that finish early go on (to the optimizer step, to the next step's
            first forwards) without waiting for another's last backward. Under ZBV, whose last stage
            shares rank 0 with the first, that wait was 0.15 s of a 2.4 s step. Layers with auxiliary
            losses (MoE) still sum theirs over ``group`` after the schedule.
        device: the device the stages compute on.
        output_batch_dim: the batch dimension of the last stage's output; ``None``: the network's
            ``output_batch_dim`` attribute, else 1 (sequence-first activations).
        max_cached_shapes: schedules kept per mode; a batch of a new shape builds new stages.
        dp_group: the data-parallel group; training losses are divided by the tokens of the global batch
            (summed over it), so replicas' gradients are then summed, not averaged.
    """

    def __init__(
        self,
        network: nn.Module,
        plan: StagePlan,
        schedule: str,
        num_microbatches: int,
        group: dist.ProcessGroup,
        loss_group: dist.ProcessGroup,
        device: torch.device,
        output_batch_dim: int | None = None,
        max_cached_shapes: int = 4,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.network = network
        self.plan = plan
        self.schedule_name = schedule
        self.num_microbatches = num_microbatches
        self.group = group
        self.device = device
        if output_batch_dim is None:
            output_batch_dim = getattr(network, "output_batch_dim", 1)
        self.output_batch_dim = output_batch_dim
        self.max_cached_shapes = max_cached_shapes
        self.dp_group = dp_group
        self.views = plan_views(network, plan)
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        # Modules with auxiliary losses (``aux_grad_scale``, ``pop_aux``, ``record``: MoE layers).
        self._aux_modules = [m for m in network.modules() if hasattr(m, "aux_grad_scale")]
        any_aux = torch.tensor([float(bool(self._aux_modules))], device=device)
        dist.all_reduce(any_aux, group=group)
        self._any_aux = bool(any_aux.item())
        """Whether a layer on any pp rank has auxiliary losses (summed over ``group`` after each run)."""
        self.loss_group = loss_group
        self._token_losses: list[Tensor] = []
        """The last stage's per-microbatch token-loss sums of the current run."""
        self._real_forward_done = False
        self._loss_broadcast: tuple[Tensor, Any] | None = None
        self._loss_scale: Tensor | None = None
        self.record_timeline = False
        self.grad_scale: float | None = None
        """fp16 loss scale: multiplies each microbatch loss before its backward (set by the strategy)."""
        self.token_sums = False
        """Leave gradients as token sums (not divided by the batch's tokens): the strategy divides them by
        the tokens of a step that accumulates several pipeline runs (set by the strategy)."""
        self.last_timeline: list[TimelineEvent] | None = None
        # The pp rank that holds the last stage broadcasts the loss (rank 0 under ZBV's V shape).
        last_owner = next(
            r
            for r, stages in enumerate(
                stage_placement(schedule, dist.get_world_size(group), len(plan.stages))
            )
            if plan.num_stages - 1 in stages
        )
        self.last_stage_rank = dist.get_global_rank(group, last_owner)

    # ---- public entry points -------------------------------------------------------------------------
    def loss(
        self, args: Sequence[Tensor], labels: Tensor, kwargs: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loss_sum, num_tokens)`` of the whole batch, the same on every pp rank.

        ``args`` enter the first stage; ``kwargs`` (``[batch, ...]`` tensors such as a padding mask) reach
        every stage's ``forward`` as keyword arguments, split into the same microbatches (every pp rank
        has the whole batch, so nothing extra is sent between stages).

        In training mode with gradients enabled the schedule also runs every backward, leaving in this
        rank's parameters the gradients of ``loss_sum / global_tokens``, where ``global_tokens`` counts the
        batches of every data-parallel replica (so replicas' gradients are summed, not averaged).
        """
        train = torch.is_grad_enabled() and self.network.training
        args, labels, kwargs, _ = self._pad(list(args), labels, kwargs)
        num_tokens = self._count_tokens(labels)
        global_tokens = num_tokens.to(torch.float32)
        sums = train and self.token_sums
        if train and self.dp_group is not None and not sums:
            global_tokens = global_tokens.clone()
            dist.all_reduce(global_tokens, group=self.dp_group)
        grad_scale = self.grad_scale if train and self.grad_scale else 1.0
        divisor = torch.ones(()) if sums else global_tokens.clamp(min=1)
        self._loss_scale = grad_scale / divisor
        entry = self._entry("train" if train else "eval", args, labels, kwargs)
        call = entry.schedule.step if train else entry.schedule.eval
        options: dict[str, Any] = {"target": labels if self.plan.has_last else None}
        if train:
            options["return_outputs"] = False
        # Auxiliary losses of layers on any stage (MoE load balancing) get their gradient injected in
        # backward with the same scale as the token loss.
        for m in self._aux_modules:
            m.aux_grad_scale = self._loss_scale if train else None
        self._token_losses = []
        self._loss_broadcast = None
        if not self.plan.has_last:  # (the last stage posts its side in _loss_fn)
            self._post_loss(torch.zeros((), device=self.device))
        try:
            self._run(entry, call, args, options, kwargs)
        finally:
            for m in self._aux_modules:
                m.aux_grad_scale = None
        if self._loss_broadcast is None:  # (not posted in _loss_fn: fewer losses than microbatches)
            self._post_loss(self._token_loss_sum())
        assert self._loss_broadcast is not None
        loss_sum, work = self._loss_broadcast
        work.wait()
        # The token loss lives on the last stage, aux losses on every stage that has aux-loss layers.
        if self._any_aux:
            aux = [a for m in self._aux_modules if (a := m.pop_aux()) is not None]
            aux_sum = (
                torch.stack(aux).sum().float().to(self.device) if aux else torch.zeros((), device=self.device)
            )
            dist.all_reduce(aux_sum, group=self.group)
            loss_sum = loss_sum + aux_sum
        return loss_sum, num_tokens.to(self.device, torch.float32)

    @torch.no_grad()
    def forward(self, args: Sequence[Tensor], kwargs: Mapping[str, Tensor] | None = None) -> Tensor:
        """The last stage's output for the whole batch (forward only), returned on every pp rank."""
        args, _, kwargs, real_rows = self._pad(list(args), None, kwargs)
        entry = self._entry("predict", args, None, kwargs)
        output = self._run(entry, entry.schedule.eval, args, {}, kwargs)
        meta = torch.zeros(8, dtype=torch.int64, device=self.device)
        if self.plan.has_last:
            meta[0] = output.ndim
            meta[1 : 1 + output.ndim] = torch.tensor(output.shape)
            meta[7] = _DTYPES.index(output.dtype)
        dist.broadcast(meta, src=self.last_stage_rank, group=self.group)
        if not self.plan.has_last:
            shape = meta[1 : 1 + int(meta[0])].tolist()
            output = torch.empty(shape, dtype=_DTYPES[int(meta[7])], device=self.device)
        output = output.contiguous()
        dist.broadcast(output, src=self.last_stage_rank, group=self.group)
        return output.narrow(self.output_batch_dim, 0, real_rows)

    # ---- internals ---------------------------------------------------------------------------------
    def _run(
        self, entry: _Entry, call: Callable, args: list[Tensor], options: dict, kwargs: dict[str, Tensor]
    ) -> Any:
        entry.events.clear()
        # A stage's first call infers shapes with a forward on placeholder data: aux-loss layers record
        # only inside the real forward calls (see _instrument).
        for m in self._aux_modules:
            m.record = False
        # Keyword inputs go to the schedule on every rank: torch passes them to each stage's forward.
        result = call(*(args if self.plan.has_first else ()), **kwargs, **options)
        if self.record_timeline:
            self.last_timeline = list(entry.events)
        for stage in entry.stages:  # free the microbatch outputs and activations kept for the next step
            stage.clear_runtime_states()
        for m in self._aux_modules:
            m.record = True
        return result

    def _count_tokens(self, labels: Tensor) -> Tensor:
        count = getattr(self.network, "count_loss_tokens", None)
        return count(labels) if count is not None else (labels != IGNORE_INDEX).sum()

    def _pad(
        self, args: list[Tensor], labels: Tensor | None, kwargs: Mapping[str, Tensor] | None
    ) -> tuple[list[Tensor], Tensor | None, dict[str, Tensor], int]:
        """Pad the batch to a multiple of ``num_microbatches`` rows (a short last batch).

        Padded rows have token 0 and ignored labels: they add nothing to the loss or the gradients.
        Keyword inputs repeat the last real row, so a padding mask stays valid (a row that masks every
        key would make attention NaN, and NaN times an ignored label is still NaN).
        """
        kwargs = dict(kwargs or {})
        rows = args[0].shape[0]
        m = self.num_microbatches
        extra = -rows % m
        if extra:
            args = [torch.cat([a, a.new_zeros((extra, *a.shape[1:]))]) for a in args]
            if labels is not None:
                labels = torch.cat([labels, labels.new_full((extra, *labels.shape[1:]), IGNORE_INDEX)])
            kwargs = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in kwargs.items()}
        return args, labels, kwargs, rows

    def _entry(
        self, mode: str, args: list[Tensor], labels: Tensor | None, kwargs: Mapping[str, Tensor]
    ) -> _Entry:
        key = (
            mode,
            torch.is_inference_mode_enabled(),
            tuple((tuple(a.shape), a.dtype) for a in args),
            None if labels is None else tuple(labels.shape),
            tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items())),
        )
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry
        # Every pp rank sees batches of the same shapes in the same order, so all build and evict alike.
        stages = [
            PipelineStage(self.views[s], s, self.plan.num_stages, self.device, group=self.group)
            for s in self.plan.stages
        ]
        entry = _Entry(stages=stages, schedule=None)
        for stage in stages:
            self._instrument(stage, entry)
        cls = SCHEDULES[self.schedule_name]
        loss_fn = None if mode == "predict" else self._loss_fn
        kw: dict[str, Any] = {
            "n_microbatches": self.num_microbatches,
            "loss_fn": loss_fn,
            "output_merge_spec": TensorChunkSpec(self.output_batch_dim),
            "scale_grads": False,
        }
        entry.schedule = cls(stages if len(stages) > 1 else stages[0], **kw)
        self._cache[key] = entry
        while sum(1 for k in self._cache if k[0] == mode) > self.max_cached_shapes:
            oldest = next(k for k in self._cache if k[0] == mode)
            del self._cache[oldest]
        return entry

    def _loss_fn(self, output: Tensor, labels: Tensor) -> Tensor:
        loss_sum, _ = self.network.loss_fn(output, labels)
        # (A stage's first call also runs the loss on placeholder tensors, to infer gradient shapes.)
        if self._real_forward_done:
            self._real_forward_done = False
            self._token_losses.append(loss_sum.detach())
            if len(self._token_losses) == self.num_microbatches:
                self._post_loss(self._token_loss_sum())  # the batch's loss is known: send it now
        assert self._loss_scale is not None
        return loss_sum * self._loss_scale.to(loss_sum.device)

    def _token_loss_sum(self) -> Tensor:
        if not self._token_losses:
            return torch.zeros((), device=self.device)
        return torch.stack([t.float() for t in self._token_losses]).sum().to(self.device)

    def _post_loss(self, value: Tensor) -> None:
        """Start the broadcast of the batch's token loss from the last stage over ``loss_group``."""
        value = value.clone()
        work = dist.broadcast(value, src=self.last_stage_rank, group=self.loss_group, async_op=True)
        self._loss_broadcast = (value, work)

    def _instrument(self, stage: PipelineStage, entry: _Entry) -> None:
        """Time this stage's forward and backward calls when ``record_timeline`` is on, and let aux-loss
        layers and the token loss record only after real forward calls (not the shape inference of a
        stage's first call, which runs forward, loss and backward on placeholder tensors)."""

        def wrap(name: str, kind: str) -> None:
            inner = getattr(stage, name)

            def clock(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
                if not self.record_timeline:
                    return inner(chunk_id, *args, **kwargs)
                start = time.time()  # wall clock: comparable between processes
                try:
                    return inner(chunk_id, *args, **kwargs)
                finally:
                    entry.events.append(TimelineEvent(kind, stage.stage_index, chunk_id, start, time.time()))

            def timed(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
                if kind != "F":
                    return clock(chunk_id, *args, **kwargs)
                for m in self._aux_modules:
                    m.record = True
                try:
                    out = clock(chunk_id, *args, **kwargs)
                finally:
                    for m in self._aux_modules:
                        m.record = False
                self._real_forward_done = stage.is_last  # the loss of this microbatch comes next
                return out

            setattr(stage, name, timed)

        wrap("forward_one_chunk", "F")
        wrap("backward_one_chunk", "B")
        wrap("backward_weight_one_chunk", "W")


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
