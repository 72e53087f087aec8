"""Data-parallel gradient buckets: reduced in pieces, each launched as soon as backward finished it.

The replicas' gradient sum is the one collective of a step that grows with the model. Sent as one flat
buffer after the whole backward (what the strategy did before), nothing hides it. Here the parameters of
each group (``dp`` for dense ones, ``edp`` for experts) are cut, in reverse registration order (roughly the
order backward produces them), into buckets of about ``bucket_cap_mb``. A post-accumulate-grad hook on
every parameter counts the gradients that are final; when a bucket's last one is, its asynchronous
collective starts (all-reduce, or reduce-scatter for the distributed optimizer) while backward goes on
with the earlier layers. :meth:`GradientBuckets.finish` waits for them just before clipping and the step,
and launches whatever backward did not (a parameter without gradient, a zero-bubble schedule whose
weight pass writes ``.grad`` without the hook).

The collectives only sum: the step's scale (``1 / dp`` or ``1 / tokens``) is applied after the wait, so
the numbers equal those of one flat reduction. Compression (``bf16``, ``fp16``, ``powersgd``) happens on
the bucket's flat buffer: see :class:`Compression`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_par.optim.gradients import local

COMPRESSIONS = (None, "bf16", "fp16", "powersgd")


@dataclass
class CommCounter:
    """Bytes this rank handed to gradient collectives this step, as sent and as they would be uncompressed."""

    sent: int = 0
    uncompressed: int = 0

    def take(self) -> tuple[int, int]:
        out = (self.sent, self.uncompressed)
        self.sent = self.uncompressed = 0
        return out


class Bucket:
    """Parameters of one dtype reduced over one group, laid end to end (padded to the group size when
    sharded: then this replica's part is ``[lo, hi)``)."""

    def __init__(
        self, group: dist.ProcessGroup | None, params: list[tuple[str, Tensor]], shard: bool
    ) -> None:
        self.group = group
        self.params = params
        self.shard = shard
        self.size = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.offsets: list[int] = []
        total = 0
        for _, p in params:
            self.offsets.append(total)
            total += local(p).numel()
        self.numel = total
        self.padded = -(-total // self.size) * self.size if shard else total
        part = self.padded // self.size
        self.lo, self.hi = (rank * part, (rank + 1) * part) if shard else (0, total)
        self.index = 0  # (set by GradientBuckets: the position in backward order)
        self.is_final = False
        self.ready = 0
        self._work: Any = None
        self._out: Tensor | None = None
        self._decompress: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return local(self.params[0][1]).dtype

    @property
    def device(self) -> torch.device:
        return local(self.params[0][1]).device

    @property
    def launched(self) -> bool:
        return self._out is not None

    def flat_grads(self) -> Tensor:
        """Every gradient end to end (zeros for a missing one: every replica sends the same sizes)."""
        parts = [
            local(p.grad).reshape(-1) if p.grad is not None else local(p).new_zeros(local(p).numel())
            for _, p in self.params
        ]
        if self.padded > self.numel:
            parts.append(parts[0].new_zeros(self.padded - self.numel))
        return torch.cat(parts)

    def launch(self, compression: Compression, counter: CommCounter) -> None:
        """Start summing the bucket's gradients over the group (asynchronously)."""
        flat = self.flat_grads()
        if self.group is None:
            self._out, self._work = flat, None
            return
        self._out, self._work, self._decompress = compression.start(self, flat, counter)

    def wait(self) -> Tensor:
        """The summed flat gradients (this replica's part when sharded), in the parameters' dtype."""
        if self._work is not None:
            self._work.wait()
        out = self._out if self._decompress is None else self._decompress()
        self._out = self._work = self._decompress = None
        self.ready = 0
        return out

    def write_grads(self, flat: Tensor) -> None:
        """Unflatten summed gradients back into ``.grad`` (not sharded)."""
        for (_, p), off in zip(self.params, self.offsets, strict=True):
            if p.grad is not None:
                g = local(p.grad)
                g.view(-1).copy_(flat[off : off + g.numel()])

    def gradients(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped as the parameters' local shards (PowerSGD's matrices)."""
        return [
            flat[off : off + local(p).numel()].view(local(p).shape)
            for (_, p), off in zip(self.params, self.offsets, strict=True)
        ]


class _HookBucket:
    """What torch's DDP comm hooks read of a bucket (``buffer``, ``index``, ``gradients``, ``is_last``)."""

    def __init__(self, bucket: Bucket, flat: Tensor, whole: frozenset[int] = frozenset()) -> None:
        self._bucket, self._flat, self._whole = bucket, flat, whole

    def buffer(self) -> Tensor:
        return self._flat

    def index(self) -> int:
        return self._bucket.index

    def gradients(self) -> list[Tensor]:
        """The parameters' gradients as matrices; those in ``whole`` flat (a vector is sent as it is)."""
        grads = self._bucket.gradients(self._flat)
        return [
            g.view(-1) if id(p) in self._whole else g
            for (_, p), g in zip(self._bucket.params, grads, strict=True)
        ]

    def is_last(self) -> bool:
        return self._bucket.is_final

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self._bucket.params]


class Compression:
    """How a bucket travels: as it is, in bf16 / fp16 (cast, sum, cast back), or PowerSGD.

    PowerSGD is torch's ``powerSGD_hook`` with its ``PowerSGDState`` (rank-r factors with error feedback
    and warm start, matrices only; vectors sent as they are; plain all-reduce before ``start_step``), run
    on these buckets through the four methods of a DDP bucket it reads. It needs whole gradients (not a
    reduce-scatter), so it does not combine with the distributed optimizer.

    ``whole``: ids of parameters PowerSGD sends as they are (the hook sees them as vectors): the strategy
    puts the token embedding there by default. Its gradient is row-sparse (only the batch's tokens have
    rows), and a rank-r approximation spreads it over every row, where Adam's normalisation turns it into
    full-size steps on rows no token touched; measured on the main job (dp=2, 300 steps, rank 4): +3.26%
    final validation loss with the tied token embedding compressed, +2.21% with it whole.
    """

    def __init__(
        self,
        kind: str | None,
        groups: Iterable[dist.ProcessGroup | None] = (),
        rank: int = 4,
        start_step: int = 10,
        whole: Iterable[int] = (),
    ) -> None:
        if kind not in COMPRESSIONS:
            raise ValueError(
                f"gradient_compression={kind!r} is not valid; choose one of {list(COMPRESSIONS)}."
            )
        self.kind = kind
        self.whole = frozenset(whole)
        self.states: dict[Any, Any] = {}
        if kind == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            self._hook = psgd.powerSGD_hook
            for g in groups:
                if g is not None:
                    self.states[g] = psgd.PowerSGDState(
                        process_group=g,
                        matrix_approximation_rank=rank,
                        start_powerSGD_iter=start_step,
                        min_compression_rate=1.0,
                        use_error_feedback=True,
                        warm_start=True,
                        random_seed=0,
                    )

    def start(self, bucket: Bucket, flat: Tensor, counter: CommCounter) -> tuple[Tensor, Any, Any]:
        """Launch the bucket's collective: ``(output, work, decompress or None)``."""
        counter.uncompressed += flat.numel() * flat.element_size()
        if bucket.shard:
            out = flat.new_empty(bucket.hi - bucket.lo)
            if self.kind in ("bf16", "fp16"):
                low = flat.to(_LOW[self.kind])
                part = low.new_empty(out.numel())
                if self.kind == "fp16":
                    low.div_(bucket.size)  # (fp16's range: the sum of d replicas must not overflow)
                counter.sent += low.numel() * low.element_size()
                work = dist.reduce_scatter_tensor(part, low, group=bucket.group, async_op=True)
                return out, work, lambda: _restore(part, out, bucket.size if self.kind == "fp16" else 1)
            counter.sent += flat.numel() * flat.element_size()
            return out, dist.reduce_scatter_tensor(out, flat, group=bucket.group, async_op=True), None
        if self.kind in ("bf16", "fp16"):
            low = flat.to(_LOW[self.kind])
            if self.kind == "fp16":
                low.div_(bucket.size)
            counter.sent += low.numel() * low.element_size()
            work = dist.all_reduce(low, group=bucket.group, async_op=True)
            return flat, work, lambda: _restore(low, flat, bucket.size if self.kind == "fp16" else 1)
        if self.kind == "powersgd":
            state = self.states[bucket.group]
            after = state.total_numel_after_compression
            fut = self._hook(state, _HookBucket(bucket, flat, self.whole))
            # The state counts the elements it sent once it compresses; before, the whole buffer went.
            sent = state.total_numel_after_compression - after or flat.numel()
            counter.sent += sent * flat.element_size()
            # (the hook returns the replicas' mean; the strategy's scale expects the sum)
            return flat, fut, lambda: _value(fut).mul_(bucket.size)
        counter.sent += flat.numel() * flat.element_size()
        return flat, dist.all_reduce(flat, group=bucket.group, async_op=True), None


_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _value(fut: Any) -> Tensor:
    value = fut.value()
    return value[0] if isinstance(value, list) else value


def _restore(low: Tensor, out: Tensor, factor: int) -> Tensor:
    out.copy_(low)
    if factor != 1:
        out.mul_(factor)
    return out


@dataclass
class GradientBuckets:
    """Every data-parallel bucket of a model, the hooks that launch them, and the wait before the step.

    Args:
        named: ``(name, parameter)`` in registration order.
        dp / edp: the groups dense / expert gradients are summed over (``None``: size 1).
        expert_ids: ``id`` of every expert parameter.
        bucket_cap_mb: the most megabytes of gradients per bucket (a larger parameter gets its own).
        shard: reduce-scatter (the distributed optimizer) instead of all-reduce.
        compression: see :class:`Compression`.
    """

    named: list[tuple[str, Tensor]]
    dp: dist.ProcessGroup | None
    edp: dist.ProcessGroup | None
    expert_ids: set[int] = field(default_factory=set)
    bucket_cap_mb: float = 25.0
    shard: bool = False
    compression: Compression = field(default_factory=lambda: Compression(None))
    buckets: list[Bucket] = field(default_factory=list)
    counter: CommCounter = field(default_factory=CommCounter)

    def __post_init__(self) -> None:
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb!r} is not valid: it must be > 0.")
        cap = self.bucket_cap_mb * 2**20
        open_: dict[tuple[bool, torch.dtype], list[tuple[str, Tensor]]] = {}
        sizes: dict[tuple[bool, torch.dtype], int] = {}
        for name, p in reversed(self.named):  # backward produces the last layers' gradients first
            if not p.requires_grad:
                continue
            key = (id(p) in self.expert_ids, local(p).dtype)
            open_.setdefault(key, []).append((name, p))
            sizes[key] = sizes.get(key, 0) + local(p).numel() * local(p).element_size()
            if sizes[key] >= cap:
                self._close(key, open_.pop(key))
                sizes[key] = 0
        for key, params in open_.items():
            self._close(key, params)
        for i, b in enumerate(self.buckets):
            b.index = i
            b.is_final = i == len(self.buckets) - 1
        self._bucket_of = {id(p): b for b in self.buckets for _, p in b.params}
        self._hooks: list[Any] = []
        self.early = 0
        self.exposed_seconds = 0.0
        self.launches_from_backward = 0
        """How many buckets the last step launched from backward (the rest left in :meth:`finish`)."""
        self.expected = 0  # accumulations per parameter before its bucket may leave (0: not armed)
        self._counts: dict[int, int] = {}

    def _close(self, key: tuple[bool, torch.dtype], params: list[tuple[str, Tensor]]) -> None:
        if params:
            self.buckets.append(Bucket(self.edp if key[0] else self.dp, params, self.shard))

    # ---- overlap --------------------------------------------------------------------------------
    def install_hooks(self, deferred: set[int] = frozenset()) -> None:
        """Launch each bucket from backward (post-accumulate-grad hooks) once :meth:`arm` says when.

        A bucket holding a parameter of ``deferred`` (ids) leaves only in :meth:`finish` (its gradient
        has another sum to take first: a weight tied across pipeline ranks, under the distributed
        optimizer).
        """
        if self.compression.kind == "powersgd":
            # Its hook chains collectives in future callbacks (another thread): buckets must go one
            # after the other, or replicas could issue them in different orders.
            return
        for b in self.buckets:
            if b.group is None or any(id(p) in deferred for _, p in b.params):
                continue
            for _, p in b.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def arm(self, accumulations: int | dict[int, int]) -> None:
        """Launch buckets during the coming backward(s): after ``accumulations`` into each ``.grad`` (one
        number, or per parameter ``id``)."""
        self.expected = accumulations
        self._counts = {}

    def disarm(self) -> None:
        self.expected = 0

    def _on_grad(self, p: Tensor) -> None:
        if not self.expected:
            return
        n = self._counts.get(id(p), 0) + 1
        self._counts[id(p)] = n
        need = self.expected if isinstance(self.expected, int) else self.expected.get(id(p))
        if n == need:
            b = self._bucket_of[id(p)]
            b.ready += 1
            if b.ready == len(b.params) and not b.launched:
                b.launch(self.compression, self.counter)
                self.early += 1

    def snapshot(self) -> dict[int, int]:
        return dict(self._counts)

    def count_written(self, module: Any, before: dict[int, int]) -> None:
        """After a call that wrote ``module``'s gradients into ``.grad`` directly (a zero-bubble weight
        pass): count those the hooks did not see, as if they had."""
        if not self.expected:
            return
        for p in module.parameters():
            if (
                id(p) in self._bucket_of
                and p.grad is not None
                and self._counts.get(id(p), 0) == before.get(id(p), 0)
            ):
                self._on_grad(p)

    # ---- the wait before the step ----------------------------------------------------------------
    def finish(self) -> list[Tensor]:
        """Every bucket's summed flat gradients (launching those backward did not), in bucket order.

        ``exposed_seconds`` is the time this took: the communication backward did not hide.
        """
        start = time.perf_counter()
        self.expected = 0
        self.launches_from_backward, self.early = self.early, 0
        sequential = self.compression.kind == "powersgd"  # (see install_hooks)
        out = []
        for b in self.buckets:
            if not b.launched:
                b.launch(self.compression, self.counter)
            if sequential:
                out.append(b.wait())
        if not sequential:
            out = [b.wait() for b in self.buckets]
        self.exposed_seconds = time.perf_counter() - start
        return out

    @torch.no_grad()
    def finish_into_grads(self, scale: float) -> None:
        """:meth:`finish`, then each summed gradient times ``scale`` back into its ``.grad``."""
        for b, flat in zip(self.buckets, self.finish(), strict=True):
            if scale != 1.0:
                flat.mul_(scale)
            b.write_grads(flat)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
