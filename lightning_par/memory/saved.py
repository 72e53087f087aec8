"""Counting the bytes autograd keeps for backward: one count per storage, for as long as it is kept.

A :class:`SavedTensorCounter` is what :class:`lightning_par.callbacks.MemoryReport` measures a step with.
Its ``saved_tensors_hooks`` see every tensor an op saves outside recomputed blocks; inside them the
block's own hooks pack the saved tensors (into empty holders), so :mod:`lightning_par.memory.recompute`
reports what a block does keep (its input, the outputs the selective policy saves, the collectives it
replays, and what its recompute fills in during backward) to the :func:`active_counter` itself.

Each count is a :class:`Lease` on some storages: it ends when the lease is released or garbage collected
(with the holder autograd drops when it frees the saved tensor). A lease keeps its tensors alive, so a
storage's address cannot be reused by another allocation while it is counted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

StorageKey = tuple[str, int]


def storage_key(t: Tensor) -> tuple[StorageKey, int] | None:
    """``((device, address), bytes)`` of the storage ``t`` lives in; ``None`` where it has none."""
    if isinstance(t, DTensor):
        t = t.to_local()
    if t.device.type == "meta" or t.is_sparse:
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # (tensors without storage: nested, functional wrappers)
        return None
    if storage.nbytes() == 0:
        return None
    return (str(t.device), storage.data_ptr()), storage.nbytes()


class Lease:
    """Counts the storages of some tensors until :meth:`release` (or until garbage collected)."""

    __slots__ = ("_counter", "_keys", "_tensors")

    def __init__(self, counter: SavedTensorCounter, keys: list[StorageKey], tensors: list[Tensor]) -> None:
        self._counter, self._keys, self._tensors = counter, keys, tensors

    def release(self) -> None:
        keys, self._keys, self._tensors = self._keys, [], []
        for key in keys:
            self._counter._drop(key)

    def __del__(self) -> None:
        self.release()


class _Saved:
    """What the counter's pack hook gives autograd: the tensor and its lease (both die with it)."""

    __slots__ = ("lease", "tensor")

    def __init__(self, tensor: Tensor, lease: Lease | None) -> None:
        self.tensor, self.lease = tensor, lease


class SavedTensorCounter:
    """Live and peak bytes of the storages held for backward, each counted once however often it is saved.

    Args:
        exclude: tensors whose storages are not activations (the module's parameters and buffers).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {found[0] for t in exclude if (found := storage_key(t)) is not None}
        self._refs: dict[StorageKey, int] = {}
        self._sizes: dict[StorageKey, int] = {}
        self._lock = threading.Lock()  # (CUDA backward runs on autograd's device threads)
        self.live = 0
        self.peak = 0

    def hold(self, tensors: Iterable[Tensor]) -> Lease:
        """Count ``tensors``' storages from now until the returned lease ends."""
        keys, kept = [], []
        with self._lock:
            for t in tensors:
                found = storage_key(t)
                if found is None or found[0] in self._exclude:
                    continue
                key, nbytes = found
                keys.append(key)
                kept.append(t)
                if self._refs.get(key, 0) == 0:
                    self._sizes[key] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] = self._refs.get(key, 0) + 1
        return Lease(self, keys, kept)

    def _drop(self, key: StorageKey) -> None:
        with self._lock:
            left = self._refs[key] - 1
            if left:
                self._refs[key] = left
            else:
                del self._refs[key]
                self.live -= self._sizes.pop(key)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks that count every tensor saved under them until autograd frees it."""

        def pack(t: Tensor) -> _Saved:
            return _Saved(t, self.hold([t]))

        def unpack(saved: _Saved) -> Tensor:
            return saved.tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


_ACTIVE: list[SavedTensorCounter] = []


def active_counter() -> SavedTensorCounter | None:
    """The counter of the step being measured, if any (recomputed blocks report to it)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def counting(counter: SavedTensorCounter) -> Iterator[SavedTensorCounter]:
    """Count what is saved inside the ``with`` block, ``counter`` being the active one."""
    handle = start(counter)
    try:
        yield counter
    finally:
        stop(handle)


def start(counter: SavedTensorCounter) -> Any:
    """Begin counting where start and end are separate hooks (a callback); the result goes to :func:`stop`."""
    hooks = counter.hooks()
    hooks.__enter__()
    _ACTIVE.append(counter)
    return counter, hooks


def stop(handle: Any) -> None:
    counter, hooks = handle
    _ACTIVE.remove(counter)
    hooks.__exit__(None, None, None)
