"""The Lightning strategy that owns the parallel layout of a run: Lightning's hooks over the engine.

Each hook hands its work to the module that owns it; ``docs/architecture.md`` follows one training step
through them. Built on Lightning's ``ModelParallelStrategy`` (launcher, process group), diverging where it
must: its mesh has no pipeline dimension, it reduces no data-parallel gradients unless the model applies
FSDP itself, and its checkpoint loading is not safe against crafted files.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics import Metric

from lightning_par.data.loader import prepare_loader
from lightning_par.distributed.groups import ParallelGroups
from lightning_par.distributed.layout import ParallelLayout, check_sizes, default_backend
from lightning_par.fault_tolerance.nonfinite import NonFiniteCheck
from lightning_par.fault_tolerance.restart import check_external_launch
from lightning_par.memory.recompute import check_recompute
from lightning_par.optim.distributed import DistributedOptimizer
from lightning_par.optim.gradients import StepTokens
from lightning_par.parallelize import Parallelized, parallelize
from lightning_par.pipeline.runner import PipelineRunner
from lightning_par.pipeline.schedules import PipelineConfig, check_schedule, stages_per_rank
from lightning_par.pipeline.step import GradientStash, check_no_accumulation
from lightning_par.planner.search import Plan
from lightning_par.protocols import check_protocol
from lightning_par.strategies.auto import apply_plan, make_plan, report_plan
from lightning_par.strategies.checkpointing import ShardedCheckpointIO
from lightning_par.strategies.gradients import GradientHandling, check_gradient_options
from lightning_par.strategies.guards import GuardedRun, RunGuards
from lightning_par.strategies.precision import ExactClipping, require_exact_clipping, with_exact_clipping


class HybridParallelStrategy(GradientHandling, GuardedRun, ShardedCheckpointIO, ModelParallelStrategy):
    """Tensor (+ sequence), pipeline, expert and data parallelism on one DeviceMesh, for protocol models.

    Args:
        tensor_parallel_size: ranks that split each layer. ``None``: every process not used by data or
            pipeline parallel (with ``pipeline_parallel_size=None`` too: the tp x pp preset, see
            :meth:`ParallelLayout.from_world_size`).
        data_parallel_size: model replicas. ``None``: whatever is left after tp and pp.
        pipeline_parallel_size: pipeline ranks. ``None``: whatever is left after tp and dp.
        sequence_parallel: run LayerNorm, dropout and residuals on sequence shards (reduce-scatter /
            all-gather instead of all-reduce).
        tp_comm_chunks: split the batch into this many chunks inside the transformer blocks, so that one
            chunk's forward all-reduce runs while the next chunk computes (1: no split; the numbers are
            the same either way). Ignored under sequence parallel.
        pipeline_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"interleaved_zero_bubble"`` or
            ``"zbv"`` (torch.distributed.pipelining schedules).
        num_microbatches: microbatches per batch under pipeline parallel (the batch size must be a multiple;
            a shorter last batch is padded with ignored rows). ``None``: one per pipeline stage.
        virtual_pipeline_size: stages per rank for the interleaved schedules (``None``: 2; ZBV always 2).
        pipeline_stage_boundaries: the first layer of every stage but the first (``None``: balanced by
            parameter count, the embedding on the first stage and the head on the last counted in).
        expert_parallel_size: ranks that split each mixture-of-experts layer's experts, carved out of the
            data-parallel replicas (it must divide ``data_parallel_size``; see
            :class:`~lightning_par.distributed.layout.ParallelLayout`). ``None``: all of them (``ep = dp``).
        distributed_optimizer: shard the optimizer state (and fp32 master weights of bf16/fp16 parameters)
            over the data-parallel replicas, experts over theirs: gradients are reduce-scattered, each
            replica steps its range, parameters are all-gathered (ZeRO-1; see
            :mod:`lightning_par.optim.distributed`).
        gradient_bucket_mb: megabytes of gradients per data-parallel bucket (DDP's ``bucket_cap_mb``).
        overlap_grad_reduce: launch each bucket's reduction as soon as backward finished it (else all of
            them after backward); see :mod:`lightning_par.optim.buckets`.
        overlap_param_gather: with the distributed optimizer, all-gather updated parameters while the next
            forward runs (each bucket waited for by the first module that needs it; until then a callback
            reading weights after the step sees last step's outside this replica's range).
        gradient_compression: ``None``, ``"bf16"``, ``"fp16"`` (the data-parallel sum sent in 16 bits) or
            ``"powersgd"`` (torch's PowerSGD: rank ``powersgd_rank`` factors with error feedback, from
            step ``powersgd_start_step``; not with the distributed optimizer). The token embedding goes
            whole unless ``powersgd_compress_embeddings`` (see :class:`~lightning_par.optim.buckets.Compression`).
        activation_checkpointing: ``"full"`` (each block keeps only its input and re-runs its forward in
            backward), ``"selective"`` (keeps matmul, attention and communication outputs, recomputes the
            rest) or ``None`` (see :mod:`lightning_par.memory.recompute`).
        recompute_num_layers: recompute only the first this many layers of each pipeline stage (``None``: all).
        layout: ``"auto"``: the planner (:mod:`lightning_par.planner`) chooses every setting above for the
            real world, model and device when fit starts (``Trainer(strategy="auto_parallel")``); see
            :mod:`lightning_par.strategies.auto`. ``planner_device``: a preset name or a
            ``lightning-par plan --calibrate`` profile (default: the GPU's preset; required on CPU);
            ``planner_global_batch_size``: sequences per step it plans for (default: the world size).
        hang_timeout: seconds without progress (a step neither started nor finished) after which the run
            ends with the stuck rank's step and Python stack (``None``: no hang detection).
        nonfinite: a NaN/Inf loss or gradient on any rank: ``"stop"`` (raise on every rank, naming them),
            ``"skip"`` (drop the step on every rank) or ``"off"``. fp16 loss scaling keeps its own rule.
        process_group_backend: ``None`` picks NCCL on CUDA and gloo otherwise.
    """

    def __init__(
        self,
        tensor_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = 1,
        sequence_parallel: bool = False,
        tp_comm_chunks: int = 1,
        pipeline_schedule: str = "1f1b",
        num_microbatches: int | None = None,
        virtual_pipeline_size: int | None = None,
        pipeline_stage_boundaries: list[int] | None = None,
        expert_parallel_size: int | None = 1,
        distributed_optimizer: bool = False,
        gradient_bucket_mb: float = 25.0,
        overlap_grad_reduce: bool = True,
        overlap_param_gather: bool = False,
        gradient_compression: str | None = None,
        powersgd_rank: int = 4,
        powersgd_start_step: int = 10,
        powersgd_compress_embeddings: bool = False,
        activation_checkpointing: str | None = None,
        recompute_num_layers: int | None = None,
        layout: str | None = None,
        planner_device: str | None = None,
        planner_global_batch_size: int | None = None,
        hang_timeout: float | None = 300.0,
        nonfinite: str = "stop",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        check_sizes(
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            expert_parallel_size=expert_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            tp_comm_chunks=tp_comm_chunks,
        )
        check_recompute(activation_checkpointing, recompute_num_layers, tp_comm_chunks)
        if layout not in (None, "auto"):
            raise ValueError(
                f"layout={layout!r} is not valid: None (the sizes given) or 'auto' (the planner)."
            )
        self._auto = (planner_global_batch_size, planner_device) if layout == "auto" else None
        self.plan: Plan | None = None
        """The planner's choice under ``layout="auto"`` (with its prediction)."""
        check_gradient_options(
            gradient_compression,
            distributed_optimizer,
            gradient_bucket_mb,
            powersgd_rank,
            powersgd_start_step,
            overlap_param_gather,
            powersgd_compress_embeddings,
        )
        # Schedule settings are checked now (Trainer(...)), against pp once the layout is known.
        pp = pipeline_parallel_size or 1
        m = pp * stages_per_rank(pipeline_schedule, virtual_pipeline_size)
        check_schedule(
            pipeline_schedule, pp, m if num_microbatches is None else num_microbatches, virtual_pipeline_size
        )
        self._sizes = (tensor_parallel_size, data_parallel_size, pipeline_parallel_size, expert_parallel_size)
        self.sequence_parallel = sequence_parallel
        self.tp_comm_chunks = tp_comm_chunks
        self.pipeline_schedule = pipeline_schedule
        self._microbatches_arg = num_microbatches
        self.virtual_pipeline_size = virtual_pipeline_size
        self.pipeline_stage_boundaries = pipeline_stage_boundaries
        self.distributed_optimizer = distributed_optimizer
        self.recompute = (activation_checkpointing, recompute_num_layers)
        self.gradient_bucket_mb = gradient_bucket_mb
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather
        self.gradient_compression = gradient_compression
        self.powersgd = (powersgd_rank, powersgd_start_step, powersgd_compress_embeddings)
        self.grad_buckets = None
        self._all_buckets = []
        self.distributed_optimizers: dict[int, DistributedOptimizer] = {}
        """The distributed optimizer of each (raw) optimizer, by ``id``."""
        self.layout: ParallelLayout | None = None
        self.groups: ParallelGroups | None = None
        """Every process group of the run (built in ``setup_environment``)."""
        self.parallelized: Parallelized | None = None
        """What the parallelize step left: gradient plan, pipeline runner, tie groups."""
        self._tokens = StepTokens()
        self._stash = GradientStash()
        self._guards = RunGuards(hang_timeout)
        self._nonfinite = NonFiniteCheck(nonfinite)
        self._norm_cache: tuple[tuple[int, ...], Tensor] | None = None

    # ---- layout and process groups ------------------------------------------------------------------
    def _resolve_layout(self) -> ParallelLayout:
        tp, dp, pp, ep = self._sizes
        layout = ParallelLayout.from_world_size(
            self.num_processes * self.num_nodes,
            tensor_parallel_size=tp,
            data_parallel_size=dp,
            pipeline_parallel_size=pp,
            sequence_parallel=self.sequence_parallel,
            devices_per_node=self.num_processes,
            expert_parallel_size=ep,
        )
        if layout.pp > 1:
            m = self.num_microbatches_for(layout)
            check_schedule(self.pipeline_schedule, layout.pp, m, self.virtual_pipeline_size)
        return layout

    def num_microbatches_for(self, layout: ParallelLayout) -> int:
        """``num_microbatches``, defaulting to one per pipeline stage."""
        if self._microbatches_arg is not None:
            return self._microbatches_arg
        return layout.pp * stages_per_rank(self.pipeline_schedule, self.virtual_pipeline_size)

    @property
    def num_microbatches(self) -> int:
        assert self.layout is not None
        return self.num_microbatches_for(self.layout)

    @property
    def requested_num_microbatches(self) -> int | None:
        """``num_microbatches`` as the user gave it (``None``: not set)."""
        return self._microbatches_arg

    def set_num_microbatches(self, num_microbatches: int) -> None:
        """Choose the microbatches per pipeline run before setup (``GlobalBatchSize`` derives them)."""
        if self.layout is not None and self.layout.pp > 1:
            check_schedule(
                self.pipeline_schedule, self.layout.pp, num_microbatches, self.virtual_pipeline_size
            )
        self._microbatches_arg = num_microbatches

    @property
    def pipeline(self) -> PipelineRunner | None:
        """The pipeline runner under pipeline parallel (the model's ``training_step`` calls its ``loss``)."""
        return self.parallelized.pipeline if self.parallelized is not None else None

    def _configure_launcher(self) -> None:
        # Runs inside Trainer(...): check the launch and the layout before any process is started.
        check_external_launch(self.cluster_environment, self.num_processes, self.num_nodes)
        if self._auto is None:  # (under layout="auto" the layout waits for the model)
            self.layout = self._resolve_layout()
        super()._configure_launcher()

    def setup_environment(self) -> None:
        if self._auto is not None and self.plan is None:
            self.plan = make_plan(self, *self._auto)
            apply_plan(self, self.plan)
        self.layout = self._resolve_layout()
        check_protocol(self.lightning_module, self.layout)  # before any process group work
        self._setup_distributed()
        self._device_mesh = self.layout.build_mesh(self.root_device.type)
        self.groups = ParallelGroups(self.layout, self._device_mesh)
        self.lightning_module._device_mesh = self._device_mesh

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or default_backend(self.root_device.type)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.device_mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    @property
    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            self.pipeline_schedule,
            self.num_microbatches,
            self.virtual_pipeline_size,
            self.pipeline_stage_boundaries,
        )

    def describe_layout(self) -> dict[str, Any]:
        assert self.layout is not None
        info = self.layout.describe(backend=self._get_process_group_backend())
        return {**info, **self.pipeline_config.describe()} if self.layout.pp > 1 else info

    # ---- precision: Lightning's plugin, clipping by the exact norm ----------------------------------
    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        self._precision_plugin = None if plugin is None else with_exact_clipping(plugin)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The global gradient norm of the latest clipped step."""
        return getattr(self.precision_plugin, "last_grad_norm", None)

    # ---- model setup --------------------------------------------------------------------------------
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # Modules that know how to fill their own (sharded) weights are built on meta: no rank ever holds
        # a full random copy. Others are built whole and sliced (every rank draws the same numbers).
        module = self.lightning_module
        meta = empty_init is not False and module is not None and hasattr(module, "init_weights")
        with torch.device("meta") if meta else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None and self.layout is not None and self.groups is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        layout = self.layout
        check = getattr(module, "check_layout", None)
        if check is not None:
            check(layout.tp, layout.sequence_parallel)
        if layout.pp > 1:
            check_no_accumulation(trainer.accumulate_grad_batches, self.num_microbatches)
        require_exact_clipping(self.precision_plugin, trainer.gradient_clip_val)
        # A module already sharded (a second Trainer over the same module) keeps its shards.
        self.parallelized = self.parallelized or getattr(module, "_lp_parallelized", None)
        if self.parallelized is None:
            config = self.pipeline_config if layout.pp > 1 else None
            self.parallelized = parallelize(
                module, layout, self.groups, self.root_device, config, self.tp_comm_chunks, *self.recompute
            )
            module._lp_parallelized = self.parallelized
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        for metric in module.modules():
            if isinstance(metric, Metric):
                metric.process_group = self.groups.group("dp")
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._setup_gradients()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        if self.plan is not None:
            report_plan(trainer, self.plan)
        if isinstance(self.precision_plugin, ExactClipping):
            self.precision_plugin.grad_norm = self.global_grad_norm

    # ---- the training step --------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        runner = self.pipeline
        module = self.lightning_module
        automatic = runner is not None and module.automatic_optimization
        # Several pipeline runs per step (a batch-size ramp-up) leave token sums: see reduce_gradients.
        accumulating = automatic and module.trainer.accumulate_grad_batches > 1
        if runner is not None:
            # fp16: the schedule's backward must see the scaled loss (the plugin's pre_backward comes too late).
            runner.prepare_step(getattr(self.precision_plugin, "loss_scale", None), token_sums=accumulating)
        if automatic:
            self._stash.begin(module.parameters(), accumulating)
        self._arm_buckets(accumulating)
        out = super().training_step(*args, **kwargs)
        self._guards.progress(module.trainer.global_step)
        self._tokens.record(out)
        if automatic:
            self._stash.end(module.parameters())
            self._tokens.grads_are_sums = accumulating
        return out

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._guards.progress(self.lightning_module.trainer.global_step)  # (a long validation is progress)
        return super().validation_step(*args, **kwargs)

    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Under pipeline parallel the schedule already ran every backward: only the hooks run here."""
        if self.pipeline is None:
            accumulate = self.lightning_module.trainer.accumulate_grad_batches
            if self._tokens.counts and (accumulate > 1 or self.layout.dp > 1):
                # Exact however the counted tokens are spread over micro-batches and replicas.
                closure_loss = self._tokens.as_token_sum(closure_loss, accumulate)
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        self._stash.restore()
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def process_dataloader(self, dataloader: object) -> object:
        """Refuse a batch size the microbatches do not divide; make training loaders resumable mid-epoch."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        m = self.num_microbatches if self.pipeline is not None else None
        return super().process_dataloader(prepare_loader(dataloader, trainer, m))

    # ---- reductions (over the groups that hold different numbers) ------------------------------------
    def sum_over_replicas_and_stages(self, tensor: Tensor) -> Tensor:
        """Sum a statistic over data-parallel replicas and pipeline stages (tp peers hold the same one)."""
        assert self.groups is not None
        return self.groups.sum_over_replicas_and_stages(tensor)

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce a logged value over data-parallel ranks only (tp/pp peers hold the same number)."""
        if self.groups is None:
            return tensor
        return self.groups.reduce(tensor, group, reduce_op)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """A decision every rank agrees on (over the whole world: tp and pp peers too, not only dp)."""
        return ParallelGroups.agree(decision, self.root_device, all)
