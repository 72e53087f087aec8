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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_par.optim.buckets import Bucket, Compression, GradientBuckets
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


class DistributedOptimizer:
    """Rewrites ``optimizer`` (in place) to step this replica's ranges; see the module docstring.

    Args:
        optimizer: the torch optimizer ``configure_optimizers`` returned (still without state).
        module: the (sharded) LightningModule, for parameter names.
        grad_sync: the layout's gradient plan (groups, expert parameters, tied copies).
        bucket_cap_mb / compression: of the reduce-scatter buckets (:class:`GradientBuckets`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        module: nn.Module,
        grad_sync: GradientSync,
        bucket_cap_mb: float = 25.0,
        compression: Compression | None = None,
    ) -> None:
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
        for name, p in order.values():
            if not local(p).is_contiguous():
                raise ValueError(f"distributed_optimizer=True needs contiguous parameters; {name} is not.")
        self.grad_buckets = GradientBuckets(
            list(order.values()),
            grad_sync.dp,
            grad_sync.edp,
            grad_sync.expert_ids,
            bucket_cap_mb,
            shard=True,
            compression=compression or Compression(None),
        )
        self.buckets = self.grad_buckets.buckets
        self.pieces_of: dict[int, list[Piece]] = {}
        pieces: dict[int, Piece] = {}
        for bucket in self.buckets:
            mine = self.pieces_of.setdefault(id(bucket), [])
            for (name, p), off in zip(bucket.params, bucket.offsets, strict=True):
                a, b = max(off, bucket.lo), min(off + local(p).numel(), bucket.hi)
                if a >= b:
                    continue
                flat = local(p).detach().view(-1)[a - off : b - off]
                shard = nn.Parameter(flat if flat.dtype == torch.float32 else flat.float())
                kind = -1 if id(p) in grad_sync.norm_duplicates else grad_sync.norm_kind(p)
                piece = Piece(name, p, a - off, b - off, a - bucket.lo, shard, kind)
                mine.append(piece)
                pieces[id(p)] = piece
        self.pieces = pieces
        self._pending: dict[int, tuple[Bucket, Tensor, Any]] = {}
        self._gather_hooks: list[Any] = []
        for group, params in zip(optimizer.param_groups, self.groups, strict=True):
            group["params"] = [pieces[id(p)].shard for p in params if id(p) in pieces]

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_scatter(self, scale: float | None) -> None:
        """Sum every gradient over its group into this replica's range, times ``scale``; drop ``.grad``."""
        for bucket, mine in zip(self.buckets, self.grad_buckets.finish(), strict=True):
            if scale is not None and scale != 1.0:
                mine.mul_(scale)
            if mine.dtype != torch.float32:
                mine = mine.float()
            for piece in self.pieces_of[id(bucket)]:
                # As without sharding, a parameter without a gradient is not stepped.
                has_grad = piece.param.grad is not None
                piece.shard.grad = mine[piece.at : piece.at + piece.end - piece.start] if has_grad else None
            for _, p in bucket.params:
                p.grad = None

    @torch.no_grad()
    def gather_parameters(self, overlap: bool = False) -> None:
        """After the optimizer step: masters into their parameters, then every range to every replica.

        ``overlap``: start the all-gathers (in forward order) and return; each bucket is waited for by the
        forward pre-hook of the first module that uses one of its parameters (:meth:`install_gather_hooks`)
        or by :meth:`wait_gathers` (checkpoints, the end of fit). Until then, this replica's parameters
        outside its own range are last step's.
        """
        for bucket in reversed(self.buckets):  # (buckets are in backward order)
            full = self._gather(bucket, lambda pc: pc.shard.detach(), bucket.dtype, async_op=overlap)
            if overlap:
                self._pending[id(bucket)] = (bucket, *full)
            else:
                _scatter_params(bucket, full)

    def install_gather_hooks(self, units: Iterable[nn.Module], rest: nn.Module | None = None) -> None:
        """A forward pre-hook on each unit (a layer, the embedding, ...): wait for the all-gathers of the
        buckets holding any parameter under it (a parent may read a child's weight without calling it);
        on ``rest``, for those holding parameters under no unit."""
        bucket_of = {id(p): id(b) for b in self.buckets for _, p in b.params}
        units = list(units)
        covered = {id(p) for m in units for p in m.parameters()}
        plans = [(m, list(m.parameters())) for m in units]
        if rest is not None:
            plans.append((rest, [p for p in rest.parameters() if id(p) not in covered]))
        for m, params in plans:
            ids = frozenset(bucket_of[id(p)] for p in params if id(p) in bucket_of)
            if ids:
                hook = m.register_forward_pre_hook(lambda _m, _args, ids=ids: self.wait_gathers(ids))
                self._gather_hooks.append(hook)

    def remove_gather_hooks(self) -> None:
        for hook in self._gather_hooks:
            hook.remove()
        self._gather_hooks = []

    @torch.no_grad()
    def wait_gathers(self, ids: Iterable[int] | None = None) -> None:
        """Finish the pending all-gathers of the buckets ``ids`` (``None``: all)."""
        if not self._pending:
            return
        for key in list(self._pending) if ids is None else [i for i in ids if i in self._pending]:
            bucket, full, work = self._pending.pop(key)
            work.wait()
            _scatter_params(bucket, full)

    def _gather(
        self,
        bucket: Bucket,
        value_of: Callable[[Piece], Tensor | None],
        dtype: torch.dtype,
        async_op: bool = False,
    ) -> Any:
        """The whole bucket's flat values, each replica contributing ``value_of(piece)`` for its pieces
        (with ``async_op``: ``(values, work)``, the values complete once ``work`` is waited for)."""
        mine = torch.zeros(bucket.hi - bucket.lo, dtype=dtype, device=bucket.device)
        for piece in self.pieces_of[id(bucket)]:
            value = value_of(piece)
            if value is not None:
                mine[piece.at : piece.at + piece.end - piece.start] = value
        if bucket.group is None:
            return (mine, _Done()) if async_op else mine
        full = mine.new_empty(bucket.padded)
        work = dist.all_gather_into_tensor(full, mine, group=bucket.group, async_op=async_op)
        return (full, work) if async_op else full

    @torch.no_grad()
    def norm(self, device: torch.device) -> Tensor:
        """The whole model's gradient norm from the reduce-scattered ranges (exact, as without sharding)."""
        sq = torch.zeros(4, device=device, dtype=torch.float32)
        for bucket in self.buckets:
            parts: list[list[Tensor]] = [[], [], [], []]
            for piece in self.pieces_of[id(bucket)]:
                if piece.kind >= 0 and piece.shard.grad is not None:
                    parts[piece.kind].append(piece.shard.grad)
            local_sq = torch.stack([sum_squares(part, device) for part in parts])
            if bucket.group is not None:
                dist.all_reduce(local_sq, group=bucket.group)
            sq += local_sq
        return self.grad_sync.combine_squares(sq).sqrt()

    def tp_partial_grads(self) -> list[Tensor]:
        """Pieces' gradients that are still partial sums over tp (sequence parallel): every tp rank lays
        out the same shapes, so a piece covers the same elements on each and the sum can come last."""
        return [
            pc.shard.grad
            for pc in self.pieces.values()
            if pc.shard.grad is not None and self.grad_sync.tp_partial(pc.param)
        ]

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
        view = self.empty_view()
        for bucket in self.buckets:
            # Per-parameter scalars (step counts) by object; which parameters have state at all.
            scalars = {
                pc.name: {k: v for k, v in st.items() if not _ranged(v, pc)}
                for pc in self.pieces_of[id(bucket)]
                if (st := self._state(pc))
            }
            keys = sorted(
                {k for pc in self.pieces_of[id(bucket)] for k, v in self._state(pc).items() if _ranged(v, pc)}
            )
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
                full = self._gather(bucket, value_of, torch.float32)
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
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": params}
            for g, params in zip(self.optimizer.param_groups, self.groups, strict=True)
        ]
        return PerParameterState(groups)

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

    def _state(self, piece: Piece) -> dict[str, Any]:
        return self.optimizer.state.get(piece.shard, {})


class _Done:
    """The work of a collective over one rank: nothing to wait for."""

    def wait(self) -> None:
        return None


class PerParameterState:
    """Quacks like an unsharded optimizer for the checkpoint code: ``param_groups`` and ``state``."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups
        self.state: dict[Tensor, dict[str, Any]] = {}


def _scatter_params(bucket: Bucket, full: Tensor) -> None:
    for (_, p), off in zip(bucket.params, bucket.offsets, strict=True):
        flat = local(p).detach().view(-1)
        flat.copy_(full[off : off + flat.numel()])


def _ranged(value: Any, piece: Piece) -> bool:
    """State laid out like the piece's elements (moments), as opposed to per-parameter scalars (steps)."""
    return isinstance(value, Tensor) and value.dim() == 1 and value.numel() == piece.end - piece.start


def _like_param(value: Tensor, p: Tensor) -> Tensor:
    """A local state tensor shaped as ``p``'s shard, as a DTensor when ``p`` is one (layout-free saves)."""
    if isinstance(p, DTensor):
        return DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return value
