"""The strategy's checkpoint hooks: every rank writes and reads its own shards, by layout-free names.

A mixin of :class:`~lightning_par.strategies.hybrid.HybridParallelStrategy`. Lightning's own gathering of
the state dict and the optimizer state is turned off (the shards are read straight from the module);
with the distributed optimizer, its state is handed to the checkpoint code per parameter, as without
sharding (:meth:`~lightning_par.optim.distributed.DistributedOptimizer.per_parameter_view`), so a
checkpoint resumes on any data-parallel size with the distributed optimizer on or off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.optim import Optimizer

from lightning_par.checkpoint.sharded import load_sharded, save_sharded
from lightning_par.optim.distributed import DistributedOptimizer


class ShardedCheckpointIO:
    """``save_checkpoint`` / ``load_checkpoint`` of the hybrid strategy (see the module docstring)."""

    distributed_optimizers: dict[int, DistributedOptimizer]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # save_checkpoint reads the shards straight from the module: nothing to gather here.
        return {}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return {}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Each rank writes its own shards (atomically: see :mod:`lightning_par.checkpoint`)."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported."
            )
        self.wait_parameter_gathers()
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        checkpoint["parallel_layout"] = self.describe_layout()
        path = Path(self.broadcast(str(filepath)))
        optimizers = [
            self.distributed_optimizers[id(o)].per_parameter_view()
            if id(o) in self.distributed_optimizers
            else o
            for o in self._raw_optimizers()
        ]
        save_sharded(path, self.lightning_module, optimizers, checkpoint, self.global_rank)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint written on any layout; nothing in its files is run (see the module)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        ties = self.parallelized.tie_groups if self.parallelized is not None else []
        aliases = {n: names[0] for names in ties for n in names[1:]}
        raw = self._raw_optimizers()
        views = {
            id(o): self.distributed_optimizers[id(o)].empty_view()
            for o in raw
            if id(o) in self.distributed_optimizers
        }
        meta = load_sharded(path, self.lightning_module, [views.get(id(o), o) for o in raw], aliases)
        for o in raw:
            if id(o) in views:
                self.distributed_optimizers[id(o)].load_view(views[id(o)])
        return meta

    def _raw_optimizers(self) -> list[Optimizer]:
        return [getattr(o, "_optimizer", o) for o in self.optimizers]
