"""What ``activation_checkpointing="selective"`` keeps, and the collectives a recompute replays.

:func:`selective_policy` is the policy of torch's selective activation checkpoint: matmul, attention and
functional-collective outputs are saved, the rest recomputed. :class:`Replay` handles the collectives
that write into a tensor they are given (the c10d ops behind ``dist.all_reduce`` and
``all_to_all_single``), for which torch's cache would be wrong: it would return the op's result (the
written tensor of the forward, or only a ``Work``) without writing into the recompute's buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import CheckpointPolicy

from lightning_par.memory.saved import Lease, active_counter, storage_key


def _ops(*names: str) -> frozenset:
    return frozenset(op.default for n in names if (op := getattr(torch.ops.aten, n, None)) is not None)


MATMULS = _ops("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm")
"""(``F.linear`` and ``matmul`` reach the dispatcher as these.)"""
ATTENTION = _ops(
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def selective_policy(func: Any, args: tuple, kwargs: dict) -> CheckpointPolicy:
    """Save matmuls, attention and functional collectives; recompute everything else.

    Attention with dropout is recomputed: it draws random numbers, and an op whose output is reused
    instead would leave every later dropout of the recompute drawing from another point of the RNG stream.
    Collectives that write into their argument (c10d ops) are replayed (see the module docstring).
    """
    if func in MATMULS:
        return CheckpointPolicy.MUST_SAVE
    if func in ATTENTION:
        names = [a.name for a in func._schema.arguments]
        i = names.index("dropout_p")
        p = args[i] if i < len(args) else kwargs.get("dropout_p", 0.0)
        return CheckpointPolicy.MUST_SAVE if not p else CheckpointPolicy.PREFER_RECOMPUTE
    if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] != "wait_tensor":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def writes_first_argument(func: Any) -> bool:
    """c10d collectives named with a trailing underscore write into their first argument."""
    return func.namespace == "c10d" and func.__name__.split(".")[0].endswith("_")


def is_exchange(func: Any) -> bool:
    return func.namespace == "c10d" and func.__name__.split(".")[0] in ("alltoall_base_", "alltoall_")


class Kept:
    """What a recomputed block's forward keeps for its recompute, besides its inputs.

    ``saved_keys`` name the storages the selective policy saved: no other op may write into them (the
    recompute would apply the write a second time). While a step is measured, ``leases`` count what is
    kept (inputs, saved outputs, what replayed collectives wrote) until the recompute has run.
    """

    def __init__(self) -> None:
        self.saved_keys: set = set()
        self.leases: list[Lease] = []

    def keep(self, tensors: list[Tensor], saved: bool = False) -> None:
        if saved:
            self.saved_keys.update(found[0] for t in tensors if (found := storage_key(t)) is not None)
        counter = active_counter()
        if counter is not None:
            self.leases.append(counter.hold(tensors))

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases = []


def policy_for(kept: Kept) -> Callable[..., CheckpointPolicy]:
    """:func:`selective_policy` for torch's ``create_selective_checkpoint_contexts``, noting in ``kept``
    what it saves."""

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        decision = selective_policy(func, args, kwargs)
        if decision is CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            kept.keep([t for t in tree_leaves(ctx.op_output) if isinstance(t, Tensor)], saved=True)
        return decision

    return policy


class Replay(TorchDispatchMode):
    """Runs the chosen collectives in the forward and keeps what they wrote; replays it in the recompute.

    In the forward it also refuses in-place writes into what the selective policy saved (``kept``).
    """

    def __init__(self, kept: Kept, chosen: Callable[[Any], bool], records: list, replaying: bool) -> None:
        super().__init__()
        self.kept, self.chosen, self.records, self.replaying = kept, chosen, records, replaying
        self.index = 0

    @classmethod
    def pair(cls, kept: Kept, every_collective: bool) -> tuple[Replay, Replay]:
        """The forward's mode and the recompute's: every c10d collective, or only all-to-all exchanges."""
        chosen = writes_first_argument if every_collective else is_exchange
        records: list = []
        return cls(kept, chosen, records, False), cls(kept, chosen, records, True)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.chosen(func):
            if not self.replaying and self.kept.saved_keys:
                self._refuse_writes_into_saved(func, args, kwargs)
            return func(*args, **kwargs)
        written = [t for t in tree_leaves(args[0]) if isinstance(t, Tensor)]
        if self.replaying:
            kept, out = self.records[self.index]
            self.index += 1
            for new, (old, version) in zip(written, kept, strict=True):
                if old._version != version:
                    raise RuntimeError(
                        f"a tensor {func} wrote in a recomputed block was changed in place later in the "
                        f"forward; the recompute cannot replay it. Use activation_checkpointing='full'."
                    )
                if storage_key(new) != storage_key(old) or new.storage_offset() != old.storage_offset():
                    new.copy_(old)
            return _substitute(out, [old for old, _ in kept], written)
        out = func(*args, **kwargs)
        aliases = [t.detach() for t in written]
        self.records.append(([(a, a._version) for a in aliases], out))
        self.kept.keep(aliases)
        return out

    def _refuse_writes_into_saved(self, func: Any, args: tuple, kwargs: dict) -> None:
        values = {**dict(zip([a.name for a in func._schema.arguments], args, strict=False)), **kwargs}
        for arg in func._schema.arguments:
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            for t in tree_leaves(values.get(arg.name)):
                found = storage_key(t) if isinstance(t, Tensor) else None
                if found is not None and found[0] in self.kept.saved_keys:
                    raise RuntimeError(
                        f"{func} writes in place into a matmul or attention output that "
                        f"activation_checkpointing='selective' keeps: the recompute would apply it twice. "
                        f"Use activation_checkpointing='full'."
                    )


def _substitute(out: Any, old: list[Tensor], new: list[Tensor]) -> Any:
    """The collective's forward result with each tensor it wrote replaced by the recompute's one."""

    def swap(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x  # (the Work handle: completed in the forward)
        for o, n in zip(old, new, strict=True):
            if storage_key(x) == storage_key(o) and x.storage_offset() == o.storage_offset():
                return n
        raise RuntimeError("a replayed collective returned a tensor it did not write.")

    return tree_map(swap, out)
