"""Activation recomputation: blocks keep less for backward and run their forward again there.

:func:`apply_activation_checkpointing` (called by ``parallelize`` after the sharding) gives each chosen
block of ``module.model.layers`` an instance ``forward``; module and parameter names do not change, so
checkpoints and the tensor-parallel plan see the same keys.

* ``"full"``: a block keeps only its inputs, and its backward first runs its forward again.
* ``"selective"``: it also keeps the outputs of matmuls, of attention without dropout and of collectives
  (torch's selective activation checkpoint, :mod:`lightning_par.memory.selective`), and recomputes the cheap,
  memory-heavy rest: layer norms, GELU, dropout, softmax outside fused attention, adds.

**Why not ``torch.utils.checkpoint`` itself.** It recomputes once per backward *call* (graph task). ZBV
splits each backward into an input pass and one weight pass per parameter group (``torch.autograd.grad``
each): a GPT block ran its forward 1 + 1 + 6 times, and under ``selective`` the second pass failed
("Trying to backward an extra time": the cache is consumed by the first). torch's ``GraphExecGroup``
shares one recompute between calls only if they unpack disjoint saved tensors, and the weight pass runs
the matmul nodes of the input pass again. Here a block's forward runs again at most once per forward, and
each tensor the recompute makes lives on the holder autograd keeps for it: it serves every pass that
needs it and is freed with it. The rest is torch's non-reentrant checkpoint: saved tensors are packed
into empty holders, the CPU and device RNG states and autocast of the forward are restored (dropout draws
the same masks; the forward's own RNG stream is left as it was), recomputation stops after the last saved
tensor, and a recompute that saves other tensors than the forward raises.

**Collectives.** A c10d collective writes into a tensor it is given (``dist.all_reduce``,
``all_to_all_single``); torch's selective cache would hand back its return value without writing, which
is wrong. Such collectives are *replayed* instead (:class:`~lightning_par.memory.selective.Replay`): the forward keeps what they wrote, the recompute copies
it into the new buffer and sends nothing. ``selective`` replays every collective; ``full`` replays the
all-to-all exchanges of blocks with expert layers (:class:`~lightning_par.protocols.AuxLossLayer`), so
MoE tokens cross the network once, and runs the tensor-parallel all-reduces again (every tp rank runs the
same graph, so they come in the same order on each).

Layers with side effects in forward (MoE statistics and auxiliary losses) skip them when
:func:`recomputing` and read their forward-time settings back with :func:`forward_value`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from lightning_par.memory.saved import Lease, active_counter
from lightning_par.memory.selective import Kept, Replay, policy_for
from lightning_par.protocols import AuxLossLayer

MODES = (None, "full", "selective")
"""Values of ``activation_checkpointing``."""


def check_recompute(mode: str | None, num_layers: int | None, tp_comm_chunks: int = 1) -> None:
    """Raise ``ValueError`` naming the setting, its value and what is valid (no process group needed)."""
    if mode not in MODES:
        raise ValueError(
            f"activation_checkpointing={mode!r} is not valid; valid values: None, 'full', 'selective'."
        )
    if num_layers is not None:
        if mode is None:
            raise ValueError(
                f"recompute_num_layers={num_layers!r} needs activation_checkpointing='full' or 'selective' "
                f"(it is None, so nothing is recomputed)."
            )
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(
                f"recompute_num_layers={num_layers!r} is not valid: it must be None (every layer) or an "
                f"integer >= 1 (the first layers of each pipeline stage)."
            )
    if mode is not None and tp_comm_chunks > 1:
        raise ValueError(
            f"activation_checkpointing={mode!r} does not combine with tp_comm_chunks={tp_comm_chunks}: the "
            f"communication overlap runs the blocks half by half, outside the forward that is recomputed; "
            f"use tp_comm_chunks=1."
        )


def apply_activation_checkpointing(
    module: nn.Module,
    mode: str | None,
    num_layers: int | None = None,
    stages: Mapping[int, nn.Module] | None = None,
) -> None:
    """Recompute the blocks of ``module.model.layers`` in backward (the first ``num_layers`` of each stage).

    Args:
        module: the sharded module; its network is ``module.model``, its blocks ``model.layers``.
        mode: ``None`` (nothing to do), ``"full"`` or ``"selective"``.
        num_layers: only the first ``num_layers`` blocks of every pipeline stage (of the network without
            pipeline parallel; a stage holding half a block counts it as one); ``None``: every block.
        stages: the pipeline runner's stage views (``PipelineRunner.views``), when there are stages. A view
            holds a copy of each block it runs only half of (``stage_view``), whose own forward is wrapped:
            each half is recomputed on its own. Call this after the views exist: a copy made later of a
            wrapped block would keep the forward of the block it was copied from.
    """
    check_recompute(mode, num_layers)
    if mode is None:
        return
    network = getattr(module, "model", None)
    layers = getattr(network, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        where = "it has no `model`" if network is None else f"`{type(network).__name__}` has no such `layers`"
        raise TypeError(
            f"activation_checkpointing={mode!r} needs the network in `{type(module).__name__}.model` with its "
            f"blocks in `layers: nn.ModuleDict` (as GPT and BERT have them); {where}."
        )
    per_stage = (
        [list(v.layers.values()) for _, v in sorted(stages.items())] if stages else [list(layers.values())]
    )
    chosen = {id(b): b for blocks in per_stage for b in blocks[:num_layers]}
    for block in chosen.values():
        if not isinstance(block.__dict__.get("forward"), RecomputedForward):
            exchange = any(isinstance(m, AuxLossLayer) for m in block.modules())
            block.forward = RecomputedForward(block.forward, mode, exchange)


class RecomputedForward:
    """A block's forward that keeps little for backward and runs again there (its instance ``forward``).

    Args:
        forward: the block's own (bound) forward.
        mode: ``"full"`` or ``"selective"``.
        exchange: the block dispatches tokens to experts: ``"full"`` replays its all-to-all exchanges.
    """

    def __init__(self, forward: Callable[..., Any], mode: str, exchange: bool) -> None:
        self.forward, self.mode, self.exchange = forward, mode, exchange

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or _regions():  # (no backward, or inside a recomputed region)
            return self.forward(*args, **kwargs)
        return _Region(self, args, kwargs).run()


# ---- what a region keeps and how it runs again ---------------------------------------------------------
class _Holder:
    """What autograd keeps for one saved tensor of a region: empty until the recompute fills it."""

    __slots__ = ("__weakref__", "lease", "tensor")

    def __init__(self) -> None:
        self.tensor: Tensor | None = None
        self.lease: Lease | None = None


class _Stop(Exception):
    """Every saved tensor is recomputed: the rest of the forward need not run."""


class RecomputeMismatch(RuntimeError):
    """The recompute saved other tensors than the forward (a forward that depends on changing state)."""


class _Region:
    """One forward of a recomputed block: its inputs, states and the holders autograd keeps."""

    def __init__(self, owner: RecomputedForward, args: tuple, kwargs: dict) -> None:
        self.fn = owner.forward
        self.inputs: tuple[tuple, dict] | None = (args, kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        self.versions = [(t, t._version) for t in tensors]
        self.holders: list[weakref.ref[_Holder]] = []
        self.meta: list[tuple] = []
        self.values: list[Any] = []
        """What :func:`forward_value` returned in the forward, in order."""
        self.value_index = 0
        self.kept = Kept()
        self.rng = _RngState(tensors)
        self.autocast = _autocast_state(tensors)
        self.replay = (
            Replay.pair(self.kept, owner.mode == "selective")
            if owner.mode == "selective" or owner.exchange
            else None
        )
        self.selective = (
            create_selective_checkpoint_contexts(policy_for(self.kept), allow_cache_entry_mutation=True)
            if owner.mode == "selective"
            else None
        )
        self.kept.keep(tensors)
        self.done = False
        self.count = 0

    def run(self) -> Any:
        args, kwargs = self.inputs
        with ExitStack() as stack:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
            stack.enter_context(_inside(self, replaying=False))
            if self.replay is not None:
                stack.enter_context(self.replay[0])
            if self.selective is not None:
                stack.enter_context(self.selective[0])
            return self.fn(*args, **kwargs)

    def _pack(self, x: Tensor) -> _Holder:
        holder = _Holder()
        self.holders.append(weakref.ref(holder))
        self.meta.append((x.shape, x.dtype, x.device))
        return holder

    def _unpack(self, holder: _Holder) -> Tensor:
        if not self.done:
            self._recompute()
        if holder.tensor is None:
            raise RecomputeMismatch("activation recomputation did not give back a tensor the backward needs.")
        return holder.tensor

    def _recompute(self) -> None:
        self.done = True
        assert self.inputs is not None
        args, kwargs = self.inputs
        for t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    f"an input of a recomputed block (shape {tuple(t.shape)}) was changed in place after the "
                    f"block's forward; recomputation would see other numbers. Do not modify block inputs "
                    f"in place, or turn activation_checkpointing off."
                )
        with ExitStack() as stack:
            stack.enter_context(self.rng.restored())
            for state in self.autocast:
                stack.enter_context(torch.autocast(**state))
            stack.enter_context(torch.enable_grad())
            # The recompute's own graph is dropped: its saved tensors are detached (a saved output with
            # its grad_fn would make a cycle through C++ that nothing collects), its hook refers to the
            # region weakly.
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_refill(weakref.ref(self)), _same))
            stack.enter_context(_inside(self, replaying=True))
            if self.replay is not None:
                stack.enter_context(self.replay[1])
            if self.selective is not None:
                stack.enter_context(self.selective[1])
            try:
                self.fn(*args, **kwargs)
            except _Stop:
                pass

        if self.count != len(self.holders):
            raise RecomputeMismatch(
                f"the recompute of a block saved {self.count} tensors, its forward {len(self.holders)}."
            )
        # What only the recompute needed goes now (the holders keep what the backward needs).
        self.inputs = self.versions = self.replay = self.selective = None
        self.values = []
        self.kept.release()


def _refill(ref: weakref.ref[_Region]) -> Callable[[Tensor], Tensor]:
    """The recompute's pack hook: the ``i``-th tensor saved fills the ``i``-th holder of the forward."""
    counter = active_counter()

    def pack(x: Tensor) -> Tensor:
        region = ref()
        t = x.detach() if x.requires_grad else x
        if region is None:
            return t
        i, region.count = region.count, region.count + 1
        if i >= len(region.holders):
            raise RecomputeMismatch("the recompute of a block saved more tensors than its forward.")
        holder = region.holders[i]()
        if holder is not None:
            if (x.shape, x.dtype, x.device) != region.meta[i]:
                shape, dtype, _ = region.meta[i]
                raise RecomputeMismatch(
                    f"saved tensor {i} of a recomputed block is {(tuple(x.shape), x.dtype)} in the recompute "
                    f"but was {(tuple(shape), dtype)} in the forward."
                )
            holder.tensor = t
            if counter is not None:
                holder.lease = counter.hold([t])
        if region.count == len(region.holders):
            raise _Stop
        return t

    return pack


def _same(x: Tensor) -> Tensor:
    return x


# ---- forward-time state ---------------------------------------------------------------------------------
_local = threading.local()


def _regions() -> list[tuple[_Region, bool]]:
    stack = getattr(_local, "regions", None)
    if stack is None:
        stack = _local.regions = []
    return stack


@contextmanager
def _inside(region: _Region, replaying: bool) -> Iterator[None]:
    stack = _regions()
    stack.append((region, replaying))
    try:
        yield
    finally:
        stack.pop()


def recomputing() -> bool:
    """Whether a recomputed block's forward is running again (in backward): skip side effects."""
    stack = _regions()
    return bool(stack) and stack[-1][1]


def forward_value(value: Any) -> Any:
    """``value``, except in a recompute, where it is what this call returned in the block's forward.

    For settings that change between forward and backward (a pipeline runner turns MoE recording off
    outside forward calls) and decide which ops run, hence which tensors are saved.
    """
    stack = _regions()
    if not stack:
        return value
    region, replaying = stack[-1]
    if not replaying:
        region.values.append(value)
        return value
    value = region.values[region.value_index]
    region.value_index += 1
    return value


class _RngState:
    """The CPU and device RNG states at a block's forward, restored (in a fork) for its recompute."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        devices = sorted({t.device for t in tensors if t.device.type not in ("cpu", "meta")}, key=str)
        self.device_type = devices[0].type if devices else None
        self.devices = [d.index for d in devices if d.type == self.device_type]
        module = torch.get_device_module(self.device_type) if self.device_type else None
        self.states = [module.get_rng_state(i) for i in self.devices] if module else []

    @contextmanager
    def restored(self) -> Iterator[None]:
        kind = self.device_type or "cuda"
        with torch.random.fork_rng(devices=self.devices, device_type=kind):
            torch.set_rng_state(self.cpu)
            if self.device_type:
                module = torch.get_device_module(self.device_type)
                for i, state in zip(self.devices, self.states, strict=True):
                    module.set_rng_state(state, i)
            yield


def _autocast_state(tensors: list[Tensor]) -> list[dict[str, Any]]:
    """``torch.autocast`` arguments that give a recompute the forward's autocast, per device type."""
    kinds = {"cpu", *(t.device.type for t in tensors if t.device.type != "meta")}
    cache = torch.is_autocast_cache_enabled()
    return [
        {
            "device_type": kind,
            "enabled": torch.is_autocast_enabled(kind),
            "dtype": torch.get_autocast_dtype(kind),
            "cache_enabled": cache,
        }
        for kind in sorted(kinds)
        if torch.amp.is_autocast_available(kind)
    ]
