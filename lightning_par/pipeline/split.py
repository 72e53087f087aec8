"""Cutting a protocol network into pipeline stages: balanced split, pruning and per-stage views."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_par.pipeline.schedules import stage_placement, stages_per_rank


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
