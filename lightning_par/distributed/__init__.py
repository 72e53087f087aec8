"""How many ranks do what (:class:`ParallelLayout`) and every process group of a run, built once."""

from lightning_par.distributed.groups import ParallelGroups
from lightning_par.distributed.layout import MESH_DIM_NAMES, ParallelLayout, check_sizes, default_backend

__all__ = ["MESH_DIM_NAMES", "ParallelGroups", "ParallelLayout", "check_sizes", "default_backend"]
