"""The named strategies: presets of :class:`HybridParallelStrategy` with the sizes a name implies.

``import lightning_par`` registers them with Lightning (``Trainer(strategy="tp")``); see ``_STRATEGIES`` in
``lightning_par/__init__.py`` for the names and their sizes.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.strategies.hybrid import HybridParallelStrategy


class TensorParallelStrategy(HybridParallelStrategy):
    """Tensor parallel (Megatron style, optional sequence parallel) composed with data parallel.

    ``Trainer(strategy="tp", devices=N)`` means tp=N. ``TensorParallelStrategy(tensor_parallel_size=2,
    data_parallel_size=2)`` on 4 processes runs dp=2 x tp=2.
    """

    def __init__(
        self,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        sequence_parallel: bool = False,
        tp_comm_chunks: int = 1,
        distributed_optimizer: bool = False,
        activation_checkpointing: str | None = None,
        recompute_num_layers: int | None = None,
        hang_timeout: float | None = 300.0,
        nonfinite: str = "stop",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            pipeline_parallel_size=1,
            sequence_parallel=sequence_parallel,
            tp_comm_chunks=tp_comm_chunks,
            distributed_optimizer=distributed_optimizer,
            activation_checkpointing=activation_checkpointing,
            recompute_num_layers=recompute_num_layers,
            hang_timeout=hang_timeout,
            nonfinite=nonfinite,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )


class PipelineParallelStrategy(HybridParallelStrategy):
    """Pipeline parallel (torch.distributed.pipelining schedules) composed with data parallel.

    ``Trainer(strategy="pp", devices=N)`` means pp=N with 1F1B and one microbatch per stage;
    ``PipelineParallelStrategy(pipeline_parallel_size=2, pipeline_schedule="zbv", num_microbatches=8)``
    sets them explicitly (data parallel takes the remaining processes).

    The arguments are :class:`HybridParallelStrategy`'s.
    """

    def __init__(
        self,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        pipeline_schedule: str = "1f1b",
        num_microbatches: int | None = None,
        virtual_pipeline_size: int | None = None,
        pipeline_stage_boundaries: list[int] | None = None,
        distributed_optimizer: bool = False,
        activation_checkpointing: str | None = None,
        recompute_num_layers: int | None = None,
        hang_timeout: float | None = 300.0,
        nonfinite: str = "stop",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            data_parallel_size=data_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            pipeline_schedule=pipeline_schedule,
            num_microbatches=num_microbatches,
            virtual_pipeline_size=virtual_pipeline_size,
            pipeline_stage_boundaries=pipeline_stage_boundaries,
            distributed_optimizer=distributed_optimizer,
            activation_checkpointing=activation_checkpointing,
            recompute_num_layers=recompute_num_layers,
            hang_timeout=hang_timeout,
            nonfinite=nonfinite,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )


class ExpertParallelStrategy(HybridParallelStrategy):
    """Expert parallel for mixture-of-experts models, with data parallel over the same ranks.

    ``Trainer(strategy="ep", devices=N)``: each MoE layer's experts are split over the N ranks (N must
    divide ``num_experts``), every dense parameter is replicated over them (data parallel), and each rank
    reads its own share of the data. ``ExpertParallelStrategy(expert_parallel_size=2, data_parallel_size=4)``
    keeps two copies of every expert (see :class:`~lightning_par.distributed.layout.ParallelLayout` for the rule).
    """

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        tensor_parallel_size: int = 1,
        distributed_optimizer: bool = False,
        activation_checkpointing: str | None = None,
        recompute_num_layers: int | None = None,
        hang_timeout: float | None = 300.0,
        nonfinite: str = "stop",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            pipeline_parallel_size=1,
            expert_parallel_size=expert_parallel_size,
            distributed_optimizer=distributed_optimizer,
            activation_checkpointing=activation_checkpointing,
            recompute_num_layers=recompute_num_layers,
            hang_timeout=hang_timeout,
            nonfinite=nonfinite,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
