"""The distributed optimizer (ZeRO-1): optimizer state and master weights sharded over data parallel.

Every data-parallel replica holds the same parameters and, without this, the same optimizer state: for
AdamW in fp32, 8 of the 16 bytes per parameter are moments every replica repeats. Here each group of
replicas (``dp`` for dense parameters, ``edp`` for experts) lays its parameters' local shards end to end in
one flat range per dtype, padded to a multiple of the group size ``d``, and each replica owns one
contiguous ``1/d`` of it. A step is then:

1. **reduce-scatter** the flat gradients (instead of all-reducing them): each replica receives the summed
   gradient of its own range only; the parameters' ``.grad`` are dropped;
2. the user's optimizer **steps its range**: its parameter groups were rewritten in place to hold one
   flat piece per (parameter, range) overlap, so weight-decay groups, learning-rate schedulers and
   Lightning's wrappers keep working on the same optimizer object;
3. **all-gather** the updated ranges into every replica's parameters.

Pieces of fp32 parameters are views of the parameters' own storage (no copy: 4 + 4 + 8/d bytes per
parameter with AdamW); pieces of bf16/fp16 parameters are fp32 master copies, so the moments and masters
are sharded too (2 + 2 + 12/d; gradients stay in the parameters' dtype, unlike Megatron's fp32 gradient
buffers, hence not its 6 + 12/d).

Only element-wise optimizers split this way (a piece's update must depend on its elements alone): torch's
SGD, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad and Adadelta. Checkpoints are written per
parameter, as without sharding (:meth:`DistributedOptimizer.per_parameter_view`), so they resume on any
data-parallel size and with the distributed optimizer on or off.

torch's ``ZeroRedundancyOptimizer`` is not used: it expects all-reduced gradients (no reduce-scatter),
partitions whole parameters, and broadcasts DTensor parameters through an op DTensor has no rule for
(``c10d.broadcast_``), so it cannot step a tensor-parallel model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_par.optim.gradients import GradientSync, local, sum_squares

ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)


@dataclass
class Piece:
    """The part ``[start, end)`` of one parameter's flattened local shard that this replica steps."""

    name: str
    param: Tensor
    start: int
    end: int
    at: int
    """Where the piece begins in its bucket's range owned by this replica."""
    shard: nn.Parameter
    """What the optimizer updates: a view of the parameter (fp32) or an fp32 master copy."""
    kind: int
    """Where its squares go in :meth:`GradientSync.combine_squares` (``-1``: a tied copy counted elsewhere)."""

    @property
    def is_view(self) -> bool:
        return self.shard.dtype == self.param.dtype


@dataclass
class Bucket:
    """Parameters of one dtype reduced over one group, laid end to end; this replica owns ``[lo, hi)``."""

    group: dist.ProcessGroup | None
    params: list[tuple[str, Tensor]]
    offsets: list[int] = field(default_factory=list)
    padded: int = 0
    lo: int = 0
    hi: int = 0
    pieces: list[Piece] = field(default_factory=list)

    def __post_init__(self) -> None:
        d = dist.get_world_size(self.group) if self.group is not None else 1
        r = dist.get_rank(self.group) if self.group is not None else 0
        total = 0
        for _, p in self.params:
            self.offsets.append(total)
            total += local(p).numel()
        self.padded = -(-total // d) * d
        size = self.padded // d
        self.lo, self.hi = r * size, (r + 1) * size

    @property
    def dtype(self) -> torch.dtype:
        return local(self.params[0][1]).dtype

    @property
    def device(self) -> torch.device:
        return local(self.params[0][1]).device

    def flat_grads(self) -> Tensor:
        """Every gradient of the bucket end to end (zeros for a missing one, so all replicas agree on sizes)."""
        parts = [
            local(p.grad).reshape(-1) if p.grad is not None else local(p).new_zeros(local(p).numel())
            for _, p in self.params
        ]
        pad = self.padded - self.offsets[-1] - local(self.params[-1][1]).numel()
        if pad:
            parts.append(parts[0].new_zeros(pad))
        return torch.cat(parts)

    def gather(self, value_of: Callable[[Piece], Tensor | None], dtype: torch.dtype) -> Tensor:
        """The whole bucket's flat values, each replica contributing ``value_of(piece)`` for its pieces."""
        mine = torch.zeros(self.hi - self.lo, dtype=dtype, device=self.device)
        for piece in self.pieces:
            value = value_of(piece)
            if value is not None:
                mine[piece.at : piece.at + piece.end - piece.start] = value
        if self.group is None:
            return mine
        full = mine.new_empty(self.padded)
        dist.all_gather_into_tensor(full, mine, group=self.group)
        return full

    def scatter_params(self, full: Tensor) -> None:
        for (_, p), off in zip(self.params, self.offsets, strict=True):
            flat = local(p).detach().view(-1)
            flat.copy_(full[off : off + flat.numel()])


class DistributedOptimizer:
    """Rewrites ``optimizer`` (in place) to step this replica's ranges; see the module docstring.

    Args:
        optimizer: the torch optimizer ``configure_optimizers`` returned (still without state).
        module: the (sharded) LightningModule, for parameter names.
        grad_sync: the layout's gradient plan (groups, expert parameters, tied copies).
    """

    def __init__(self, optimizer: Optimizer, module: nn.Module, grad_sync: GradientSync) -> None:
        if not isinstance(optimizer, ELEMENTWISE):
            names = ", ".join(c.__name__ for c in ELEMENTWISE)
            raise TypeError(
                f"distributed_optimizer=True shards the optimizer element-wise, which is only exact for "
                f"element-wise optimizers ({names}); got {type(optimizer).__name__}. Use one of those, or "
                f"distributed_optimizer=False."
            )
        if optimizer.state:
            raise RuntimeError("distributed_optimizer=True must wrap an optimizer before its first step.")
        self.optimizer = optimizer
        self.grad_sync = grad_sync
        names = {id(p): n for n, p in module.named_parameters()}
        self.groups: list[list[Tensor]] = []  # each param group's model parameters, in order
        order: dict[int, tuple[str, Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        "distributed_optimizer=True needs every optimized tensor to be a parameter of the "
                        f"LightningModule; a {tuple(p.shape)} tensor of the optimizer is not."
                    )
                order.setdefault(id(p), (names[id(p)], p))
            self.groups.append(list(group["params"]))
        keyed: dict[tuple[bool, torch.dtype], list[tuple[str, Tensor]]] = {}
        for name, p in order.values():
            if not local(p).is_contiguous():
                raise ValueError(f"distributed_optimizer=True needs contiguous parameters; {name} is not.")
            expert = id(p) in grad_sync.expert_ids
            keyed.setdefault((expert, local(p).dtype), []).append((name, p))
        self.buckets = [
            Bucket(grad_sync.edp if expert else grad_sync.dp, params) for (expert, _), params in keyed.items()
        ]
        pieces: dict[int, Piece] = {}
        for bucket in self.buckets:
            for (name, p), off in zip(bucket.params, bucket.offsets, strict=True):
                a, b = max(off, bucket.lo), min(off + local(p).numel(), bucket.hi)
                if a >= b:
                    continue
                flat = local(p).detach().view(-1)[a - off : b - off]
                shard = nn.Parameter(flat if flat.dtype == torch.float32 else flat.float())
                kind = -1 if id(p) in grad_sync.norm_duplicates else grad_sync.norm_kind(p)
                piece = Piece(name, p, a - off, b - off, a - bucket.lo, shard, kind)
                bucket.pieces.append(piece)
                pieces[id(p)] = piece
        self.pieces = pieces
        for group, params in zip(optimizer.param_groups, self.groups, strict=True):
            group["params"] = [pieces[id(p)].shard for p in params if id(p) in pieces]

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_scatter(self, scale: float | None) -> None:
        """Sum every gradient over its group into this replica's range, times ``scale``; drop ``.grad``."""
        for bucket in self.buckets:
            flat = bucket.flat_grads()
            if bucket.group is None:
                mine = flat[bucket.lo : bucket.hi]
            else:
                mine = flat.new_empty(bucket.hi - bucket.lo)
                dist.reduce_scatter_tensor(mine, flat, group=bucket.group)
            if scale is not None and scale != 1.0:
                mine.mul_(scale)
            if mine.dtype != torch.float32:
                mine = mine.float()
            for piece in bucket.pieces:
                # As without sharding, a parameter without a gradient is not stepped.
                has_grad = piece.param.grad is not None
                piece.shard.grad = mine[piece.at : piece.at + piece.end - piece.start] if has_grad else None
            for _, p in bucket.params:
                p.grad = None

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """After the optimizer step: masters into their parameters, then every range to every replica."""
        for bucket in self.buckets:
            bucket.scatter_params(bucket.gather(lambda pc: pc.shard.detach(), bucket.dtype))

    @torch.no_grad()
    def norm(self, device: torch.device) -> Tensor:
        """The whole model's gradient norm from the reduce-scattered ranges (exact, as without sharding)."""
        sq = torch.zeros(4, device=device, dtype=torch.float32)
        for bucket in self.buckets:
            parts: list[list[Tensor]] = [[], [], [], []]
            for piece in bucket.pieces:
                if piece.kind >= 0 and piece.shard.grad is not None:
                    parts[piece.kind].append(piece.shard.grad)
            local_sq = torch.stack([sum_squares(part, device) for part in parts])
            if bucket.group is not None:
                dist.all_reduce(local_sq, group=bucket.group)
            sq += local_sq
        return self.grad_sync.combine_squares(sq).sqrt()

    def model_parameters(self) -> list[Tensor]:
        """The module parameters this optimizer updates (their ``.grad`` hold the backward's gradients)."""
        return [p for bucket in self.buckets for _, p in bucket.params]

    def owns(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are (some of) this optimizer's pieces."""
        shards = {id(pc.shard) for pc in self.pieces.values()}
        return bool(params) and all(id(p) in shards for p in params)

    def named_gradients(self) -> Iterator[tuple[str, Tensor]]:
        """``(name[start:end], piece)`` for the non-finite check: the pieces hold the step's gradients."""
        for piece in self.pieces.values():
            yield f"{piece.name}[{piece.start}:{piece.end}]", piece.shard

    # ---- checkpoints: per parameter, as without sharding -------------------------------------------
    def per_parameter_view(self) -> PerParameterState:
        """The optimizer as if unsharded, for saving: every replica gathers every parameter's state.

        Transient: while a checkpoint is written each replica holds the whole (tp-local) state once.
        """
        view = self._empty_view()
        for bucket in self.buckets:
            # Per-parameter scalars (step counts) by object; which parameters have state at all.
            scalars = {
                pc.name: {k: v for k, v in st.items() if not _ranged(v, pc)}
                for pc in bucket.pieces
                if (st := self._state(pc))
            }
            keys = sorted({k for pc in bucket.pieces for k, v in self._state(pc).items() if _ranged(v, pc)})
            seen = [(scalars, keys)]
            if bucket.group is not None:
                seen = [None] * dist.get_world_size(bucket.group)
                dist.all_gather_object(seen, (scalars, keys), group=bucket.group)
            by_name: dict[str, dict[str, Any]] = {}
            for entry, _ in seen:
                for name, values in entry.items():
                    by_name.setdefault(name, values)
            ranged = {
                k: lambda pc, k=k: self._state(pc).get(k) for k in sorted({k for _, ks in seen for k in ks})
            }
            if bucket.dtype != torch.float32:
                # fp32 masters, so that a resume keeps the precision the bf16/fp16 weights lost
                ranged["master"] = lambda pc: pc.shard.detach()
            for key, value_of in ranged.items():
                full = bucket.gather(value_of, torch.float32)
                for (name, p), off in zip(bucket.params, bucket.offsets, strict=True):
                    if name in by_name:
                        value = full[off : off + local(p).numel()].view(local(p).shape)
                        view.state.setdefault(p, {})[key] = _like_param(value.clone(), p)
            for name, p in bucket.params:
                if name in by_name:
                    view.state.setdefault(p, {}).update(
                        {k: v.clone() if isinstance(v, Tensor) else v for k, v in by_name[name].items()}
                    )
        return view

    def empty_view(self) -> PerParameterState:
        """An unsharded-looking optimizer for :func:`load_sharded` to fill; then :meth:`load_view`."""
        return self._empty_view()

    @torch.no_grad()
    def load_view(self, view: PerParameterState) -> None:
        """Take this replica's ranges of a per-parameter state (and the loaded hyper-parameters)."""
        for group, loaded in zip(self.optimizer.param_groups, view.param_groups, strict=True):
            group.update({k: v for k, v in loaded.items() if k != "params"})
        self.optimizer.state.clear()
        for piece in self.pieces.values():
            fields = view.state.get(piece.param, {})
            if not piece.is_view:  # the master: saved one, else the (bf16/fp16) weights just loaded
                master = fields.get("master", piece.param)
                piece.shard.copy_(local(master).detach().reshape(-1)[piece.start : piece.end])
            state = {}
            for key, value in fields.items():
                if key == "master":
                    continue
                if isinstance(value, Tensor) and local(value).dim() > 0:  # shaped like the parameter
                    flat = local(value).reshape(-1)[piece.start : piece.end]
                    state[key] = flat.to(piece.shard.dtype).clone()
                else:
                    state[key] = local(value).clone() if isinstance(value, Tensor) else value
            if state:
                self.optimizer.state[piece.shard] = state

    def _empty_view(self) -> PerParameterState:
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": params}
            for g, params in zip(self.optimizer.param_groups, self.groups, strict=True)
        ]
        return PerParameterState(groups)

    def _state(self, piece: Piece) -> dict[str, Any]:
        return self.optimizer.state.get(piece.shard, {})


class PerParameterState:
    """Quacks like an unsharded optimizer for the checkpoint code: ``param_groups`` and ``state``."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups
        self.state: dict[Tensor, dict[str, Any]] = {}


def _ranged(value: Any, piece: Piece) -> bool:
    """State laid out like the piece's elements (moments), as opposed to per-parameter scalars (steps)."""
    return isinstance(value, Tensor) and value.dim() == 1 and value.numel() == piece.end - piece.start


def _like_param(value: Tensor, p: Tensor) -> Tensor:
    """A local state tensor shaped as ``p``'s shard, as a DTensor when ``p`` is one (layout-free saves)."""
    if isinstance(p, DTensor):
        return DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return value
