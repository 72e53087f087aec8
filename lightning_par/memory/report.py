"""What one rank holds, in bytes: parameters, gradients, optimizer state, and a step's saved activations.

The numbers a memory planner predicts, so each is defined exactly:

``params``
    this rank's parameters (local shards of DTensors), each storage once (tied weights share one);
``grads``
    their ``.grad`` right after backward (before any reduction replaces them);
``optimizer_moments``
    every tensor in ``optimizer.state`` (AdamW: ``exp_avg`` and ``exp_avg_sq`` in the parameters'
    dtype, and a 4-byte ``step`` per parameter);
``optimizer_master``
    tensors the optimizer steps that are not the module's parameters (fp32 master copies of bf16
    parameters under the distributed optimizer; pieces that are views of a parameter count nothing);
``optimizer``
    the two together;
``activations_peak``
    the peak over the step of the storages held for backward (:mod:`lightning_par.memory.saved`),
    parameters and buffers left out, blocks under activation recomputation included;
``cuda_max_allocated``
    ``torch.cuda.max_memory_allocated`` over the step (``None`` off CUDA).

Each sum counts a storage once: a view and its base, or two state tensors sharing memory, are one storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_par.memory.saved import storage_key

KEYS = (
    "params",
    "grads",
    "optimizer_moments",
    "optimizer_master",
    "optimizer",
    "activations_peak",
    "cuda_max_allocated",
)
"""The report's keys, in the order the table shows them."""


def storage_bytes(tensors: Iterable[Tensor | None], exclude: set | None = None) -> int:
    """Bytes of the distinct storages of ``tensors`` (``None`` entries and ``exclude``'s keys skipped)."""
    seen: dict[Any, int] = {}
    for t in tensors:
        found = storage_key(t) if isinstance(t, Tensor) else None
        if found is not None and (exclude is None or found[0] not in exclude):
            seen[found[0]] = found[1]
    return sum(seen.values())


def parameter_bytes(module: nn.Module) -> int:
    return storage_bytes(module.parameters())


def gradient_bytes(module: nn.Module) -> int:
    return storage_bytes(p.grad for p in module.parameters())


def optimizer_bytes(optimizers: Iterable[Optimizer], module: nn.Module) -> tuple[int, int]:
    """``(moments, master)``: the state tensors, and the stepped tensors that are not parameters."""
    params = {found[0] for p in module.parameters() if (found := storage_key(p)) is not None}
    state: list[Tensor] = []
    stepped: list[Tensor] = []
    for opt in optimizers:
        for values in opt.state.values():
            state.extend(v for v in values.values() if isinstance(v, Tensor))
        for group in opt.param_groups:
            stepped.extend(group["params"])
    return storage_bytes(state), storage_bytes(stepped, exclude=params)


def static_report(module: nn.Module, optimizers: Iterable[Optimizer], grads: int) -> dict[str, int | None]:
    """The report without the step's measures (``activations_peak`` 0, ``cuda_max_allocated`` None)."""
    moments, master = optimizer_bytes(list(optimizers), module)
    return {
        "params": parameter_bytes(module),
        "grads": grads,
        "optimizer_moments": moments,
        "optimizer_master": master,
        "optimizer": moments + master,
        "activations_peak": 0,
        "cuda_max_allocated": None,
    }


def cuda_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def format_bytes(n: int | None) -> str:
    """``"1.50 MiB (1,572,864 B)"``; ``"-"`` for ``None``."""
    return "-" if n is None else f"{n / 2**20:.2f} MiB ({n:,} B)"


def format_table(reports: list[dict[str, int | None]]) -> str:
    """One row per rank, one column per key (MiB with the exact bytes)."""
    header = ["rank", *KEYS]
    rows = [[str(r), *(format_bytes(rep[k]) for k in KEYS)] for r, rep in enumerate(reports)]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
