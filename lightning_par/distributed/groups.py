"""Every process group of a run, built once from the layout's DeviceMesh and passed explicitly.

The strategy builds one :class:`ParallelGroups` right after the default process group exists; the
parallelize step, gradient reduction, the pipeline runner, MoE layers and the async saver take their
groups from it. Groups that depend on how the model is cut (the ranks holding both copies of a weight
tied across pipeline stages) are made on request by :meth:`ParallelGroups.stage_group`, collectively and
cached, so a set of ranks never gets two groups. No module-level state: a second run in the same process
builds its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from lightning_par.distributed.layout import ParallelLayout


class ParallelGroups:
    """The process groups of one layout. Groups of size 1 are ``None`` (nothing to reduce over).

    Attributes:
        mesh: the ``(pp, dp, tp)`` DeviceMesh.
        tp, dp, pp: this rank's tensor-, data- and pipeline-parallel groups (``None`` where size 1).
        ep: the expert-parallel group (dispatch; ``None`` where ``ep == 1``).
        edp: the replicas holding the same experts (expert gradients are reduced over it; the whole
            ``dp`` group when ``ep == 1``).
    """

    def __init__(self, layout: ParallelLayout, mesh: DeviceMesh) -> None:
        self.layout = layout
        self.mesh = mesh
        self.tp = mesh["tp"].get_group() if layout.tp > 1 else None
        self.dp = mesh["dp"].get_group() if layout.dp > 1 else None
        self.pp = mesh["pp"].get_group() if layout.pp > 1 else None
        self.ep: dist.ProcessGroup | None = None
        self.edp: dist.ProcessGroup | None = None
        if layout.ep > 1:
            self.ep, self.edp = layout.expert_groups(mesh)
        elif layout.dp > 1:
            self.edp = self.dp  # every replica holds every expert
        self._stage_groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        self._side_groups: dict[str, dist.ProcessGroup] = {}

    # ---- ranks -----------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (adjacent dp replicas form one)."""
        return self.dp_rank % self.layout.ep

    def group(self, dim: str) -> dist.ProcessGroup:
        """The mesh group of ``dim`` (``"tp"``, ``"dp"``, ``"pp"``) even where its size is 1."""
        return self.mesh[dim].get_group()

    # ---- groups made on request ------------------------------------------------------------------
    def stage_group(self, pp_ranks: list[int]) -> dist.ProcessGroup | None:
        """A group over ``pp_ranks`` of this rank's model replica (``None`` if this rank is not in them).

        Collective: every rank calls it with the same ``pp_ranks`` in the same order, and takes part in
        creating the group of every (dp, tp) position, as ``new_group`` requires.
        """
        key = tuple(pp_ranks)
        if key not in self._stage_groups:
            grid = self.mesh.mesh  # [pp, dp, tp] global ranks
            mine = None
            for d in range(self.layout.dp):
                for t in range(self.layout.tp):
                    ranks = [int(grid[r, d, t]) for r in pp_ranks]
                    group = dist.new_group(ranks)
                    if dist.get_rank() in ranks:
                        mine = group
            self._stage_groups[key] = mine
        return self._stage_groups[key]

    def side_channel(self, name: str) -> dist.ProcessGroup:
        """A gloo group over the whole world for ``name``, whose messages never interleave with training's.

        Collective on first use (every rank asks for the same names in the same order). Used by the async
        saver's background writes and the deferred SIGTERM flag.
        """
        if name not in self._side_groups:
            self._side_groups[name] = dist.new_group(backend="gloo")
        return self._side_groups[name]

    # ---- reductions of logged values ---------------------------------------------------------------
    def sum_over_replicas_and_stages(self, tensor: Tensor) -> Tensor:
        """Sum a statistic over data-parallel replicas and pipeline stages (tp peers hold the same one)."""
        out = tensor.detach().clone()
        for group in (self.dp, self.pp):
            if group is not None:
                dist.all_reduce(out, group=group)
        return out

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce a logged value over data-parallel ranks only (tp/pp peers hold the same number)."""
        if not isinstance(tensor, Tensor):
            return tensor
        if self.dp is None and group is None:
            return tensor
        group = self.dp if group is None else group
        op = str(reduce_op).lower().rsplit(".", 1)[-1] if reduce_op is not None else "mean"  # "ReduceOp.SUM"
        out = tensor.detach().clone().float() if not tensor.is_floating_point() else tensor.detach().clone()
        if op in ("mean", "avg", "sum"):
            dist.all_reduce(out, group=group)
            if op in ("mean", "avg"):
                out /= dist.get_world_size(group)
        elif op == "max":
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        elif op == "min":
            dist.all_reduce(out, op=dist.ReduceOp.MIN, group=group)
        else:
            raise ValueError(f"reduce_op={reduce_op!r} is not supported; use 'mean', 'sum', 'max' or 'min'.")
        return out

    @staticmethod
    def agree(decision: bool, device: torch.device, all: bool = True) -> bool:
        """A decision every rank of the world agrees on (tp and pp peers too, not only dp)."""
        flag = torch.tensor(int(decision), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN if all else dist.ReduceOp.MAX)
        return bool(flag.item())
