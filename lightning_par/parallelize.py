"""Model surgery at setup: materialising meta tensors, filtering plans, finding tied weights.

Used by :class:`lightning_par.strategy.HybridParallelStrategy` while it shards a LightningModule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer real (uninitialised) storage on ``device``.

    Only meta tensors are touched (``module.to_empty()`` would also wipe the metrics' states), and a
    tensor shared by several modules (tied weights) gets one new tensor shared the same way.
    """
    new: dict[int, Tensor] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in new:
                    empty = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        empty = nn.Parameter(empty, requires_grad=t.requires_grad)
                    new[id(t)] = empty
                store[name] = new[id(t)]


def present(module: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """A tensor-parallel plan for the modules this rank holds, with its patterns spelled out.

    Pipeline stages differ in what they hold, down to half a block (a stage may hold a layer's attention
    and not its MLP); ``parallelize_module`` warns for every pattern a module lacks, so each pattern
    becomes the names of the modules it matches here.
    """
    from fnmatch import fnmatchcase

    def matches(name: str, key: str) -> bool:  # token by token, as parallelize_module reads patterns
        tokens, patterns = name.split("."), key.split(".")
        return len(tokens) == len(patterns) and all(map(fnmatchcase, tokens, patterns))

    names = [n for n, _ in module.named_modules()]
    return {name: style for key, style in plan.items() for name in names if matches(name, key)}


def tied_names(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied weights), in registration order."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
