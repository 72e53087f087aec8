"""The parallel layout: how many ranks do what, checked once, and the one DeviceMesh built from it.

Every other part of the package asks the layout for its process groups instead of keeping module-level
"parallel state". Mesh dimensions run outermost to innermost as ``pp``, ``dp``, ``tp``: tensor parallel
peers are adjacent ranks (inside one node on a GPU cluster), pipeline stages are the farthest apart.

Expert parallel is carved out of data parallel: the ``dp`` replicas of a (pp, tp) position are split into
``dp / ep`` expert-data-parallel groups of ``ep`` adjacent replicas, and each such group shares one set of
experts, ``num_experts / ep`` per rank. Dense parameters are still replicated over all ``dp`` replicas
(gradients reduced over ``dp``); an expert's parameters over the ``dp / ep`` replicas that hold it
(reduced over that expert-data-parallel group). Experts are tensor-parallel over ``tp`` like the dense MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM_NAMES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each kind of parallelism. ``world_size = pp * dp * tp``."""

    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_parallel_size: int = 1
    """Ranks that split the experts of a MoE layer; a divisor of ``data_parallel_size``."""

    def __post_init__(self) -> None:
        for name in (
            "data_parallel_size",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "expert_parallel_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: it must be an integer >= 1.")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            # Not an error in Megatron either, but worth knowing: with tp=1 there is nothing to shard.
            object.__setattr__(self, "sequence_parallel", False)
        if self.data_parallel_size % self.expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size={self.expert_parallel_size} does not divide data_parallel_size="
                f"{self.data_parallel_size}: the expert-parallel group is carved out of the data-parallel "
                f"ranks; valid expert_parallel_size: {_divisors(self.data_parallel_size)}."
            )

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def dp(self) -> int:
        return self.data_parallel_size

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_parallel_size

    @classmethod
    def from_world_size(
        cls,
        world_size: int,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = 1,
        sequence_parallel: bool = False,
        devices_per_node: int | None = None,
        expert_parallel_size: int | None = 1,
    ) -> ParallelLayout:
        """Fill in whichever sizes are ``None`` so that the product matches ``world_size``.

        * tp and dp unset (pp given): every rank left after pp goes to tensor parallel (``strategy="tp"``
          on N devices means tp=N; ``strategy="pp"`` means pp=N).
        * tp and pp both unset (``strategy="tp_pp"``): tensor parallel fills a node, up to 8 ranks and at
          most half the ranks, then pipeline parallel takes the rest: ``tp = min(8, devices_per_node,
          world / dp / 2)``, ``pp = world / dp / tp``. 4 devices: tp=2, pp=2; 8: tp=4, pp=2;
          16 on 2 nodes of 8: tp=8, pp=2; 32: tp=8, pp=4.
        * ``expert_parallel_size=None``: every data-parallel replica (``ep = dp``).
        """
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} is not valid: it must be an integer >= 1.")
        pp = pipeline_parallel_size
        if pp is None and tensor_parallel_size is None:
            dp = data_parallel_size or 1
            if world_size % dp or world_size // dp < 2:
                raise ValueError(
                    f"the tensor x pipeline preset needs at least 2 processes per data-parallel replica, but "
                    f"{world_size} processes / data_parallel_size {dp} leaves {world_size / dp:g}; start more "
                    f"processes or set tensor_parallel_size and pipeline_parallel_size explicitly."
                )
            per_replica = world_size // dp
            tp = min(8, devices_per_node or per_replica, per_replica // 2)
            while per_replica % tp:
                tp -= 1
            return cls.from_world_size(
                world_size,
                tp,
                data_parallel_size,
                per_replica // tp,
                sequence_parallel,
                devices_per_node,
                expert_parallel_size,
            )
        if pp is None:
            known = (tensor_parallel_size or 1) * (data_parallel_size or 1)
            if world_size % known:
                raise ValueError(
                    f"tensor_parallel_size x data_parallel_size = {known} does not divide the number of "
                    f"processes ({world_size}); valid products: {_divisors(world_size)}."
                )
            pp = world_size // known
        if pp < 1 or world_size % pp:
            raise ValueError(
                f"pipeline_parallel_size={pp} does not divide the number of processes ({world_size}); "
                f"valid choices: {_divisors(world_size)}."
            )
        rest = world_size // pp
        tp, dp = tensor_parallel_size, data_parallel_size
        if tp is None and dp is None:
            tp, dp = rest, 1
        elif tp is None:
            if dp < 1 or rest % dp:
                raise ValueError(
                    f"data_parallel_size={dp} does not divide the {rest} processes left after pipeline "
                    f"parallel; valid choices: {_divisors(rest)}."
                )
            tp = rest // dp
        elif dp is None:
            if tp < 1 or rest % tp:
                raise ValueError(
                    f"tensor_parallel_size={tp} does not divide the number of processes ({world_size} "
                    f"devices x nodes / pipeline_parallel_size {pp} = {rest}); valid choices: {_divisors(rest)}."
                )
            dp = rest // tp
        if tp * dp * pp != world_size:
            raise ValueError(
                f"data_parallel_size={dp} x tensor_parallel_size={tp} x pipeline_parallel_size={pp} = "
                f"{dp * tp * pp}, but {world_size} processes were started (devices x num_nodes); "
                f"make the product equal the number of processes."
            )
        return cls(
            data_parallel_size=dp,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            sequence_parallel=sequence_parallel,
            expert_parallel_size=dp if expert_parallel_size is None else expert_parallel_size,
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One DeviceMesh over all ranks with named dimensions ``pp``, ``dp``, ``tp``."""
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"The layout needs {self.world_size} processes (dp={self.dp} x tp={self.tp} x pp={self.pp}) "
                f"but the process group has {dist.get_world_size()}."
            )
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIM_NAMES)

    def expert_groups(self, mesh: DeviceMesh) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """This rank's expert-parallel group and expert-data-parallel group (``None`` where size 1).

        Within each (pp, tp) position the dp replicas ``d`` form ep groups of adjacent replicas
        (``d // ep`` equal) and expert-data-parallel groups of replicas holding the same experts
        (``d % ep`` equal). Every rank takes part in creating every group, in the same order.
        """
        ep, edp = self.ep, self.dp // self.ep
        ranks = mesh.mesh.view(self.pp, edp, ep, self.tp)
        me = dist.get_rank()
        ep_group = edp_group = None
        for p in range(self.pp):
            for t in range(self.tp):
                if ep > 1:
                    for e in range(edp):
                        members = [int(r) for r in ranks[p, e, :, t]]
                        g = dist.new_group(members)
                        if me in members:
                            ep_group = g
                if edp > 1:
                    for i in range(ep):
                        members = [int(r) for r in ranks[p, :, i, t]]
                        g = dist.new_group(members)
                        if me in members:
                            edp_group = g
        return ep_group, edp_group

    def describe(self, backend: str | None = None) -> dict[str, Any]:
        """The layout as a flat dict for loggers (W&B run config) and checkpoints."""
        info = {
            "dp": self.dp,
            "tp": self.tp,
            "pp": self.pp,
            "sequence_parallel": self.sequence_parallel,
            "ep": self.ep,
            "world_size": self.world_size,
        }
        if backend is not None:
            info["backend"] = backend
        return info

    def asdict(self) -> dict[str, Any]:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_backend(device_type: str) -> str:
    """NCCL for CUDA, gloo otherwise: the only place the backend is chosen."""
    return "nccl" if device_type == "cuda" and torch.distributed.is_nccl_available() else "gloo"


def check_sizes(**sizes: int | None) -> None:
    """Each size a strategy was given is ``None`` or an integer >= 1 (``tp_comm_chunks``: an integer >= 1)."""
    for name, value in sizes.items():
        if value is None and name != "tp_comm_chunks":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            allowed = "an integer >= 1" if name == "tp_comm_chunks" else "None or an integer >= 1"
            raise ValueError(f"{name}={value!r} is not valid: it must be {allowed}.")
