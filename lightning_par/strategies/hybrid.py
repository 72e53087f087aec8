"""The Lightning strategy that owns the parallel layout of a run.

Flow of one run (``Trainer(strategy="tp_pp", devices=N)``):

1. ``_configure_launcher`` (at ``Trainer(...)``): the layout and the pipeline schedule settings are
   checked against ``devices x num_nodes`` before any process starts.
2. ``setup_environment``: process group (NCCL on CUDA, gloo on CPU) and the ``(pp, dp, tp)`` DeviceMesh.
3. Lightning calls the module's ``configure_model`` under :meth:`tensor_init_context` (meta device).
4. ``setup``: under pipeline parallel the network is cut to this rank's stages
   (:mod:`lightning_par.pipeline`); each mixture-of-experts layer keeps this rank's block of experts
   and dispatches over the expert-parallel group (:mod:`lightning_par.experts`); the module's tensor-parallel plan is applied with
   ``parallelize_module``; parameters are materialised and filled by the module's ``init_weights`` (same
   numbers on every layout); tied weights are tied again; metrics are pointed at the data-parallel group;
   optimizers are built.
5. Each optimizer step: forward and backward run as usual (with pp > 1, inside ``training_step``, by the
   schedule; ``backward`` only runs the hooks); then the gradients are summed over the tensor-parallel
   group where sequence parallel left them partial, averaged over data parallel (one flat bucket each;
   expert parameters over their expert-data-parallel group only),
   summed between the copies of a weight tied across pipeline ranks, clipped by the true global norm,
   and the optimizer steps.
6. Checkpoints: every rank writes its shards, atomically, and loads any layout's checkpoint without
   unpickling anything but DCP metadata (:mod:`lightning_par.checkpoint`).

This builds on Lightning's ``ModelParallelStrategy`` (launcher, process group) and diverges where it
must: its mesh has no pipeline dimension, it never reduces data-parallel gradients unless the model
applies FSDP itself (DESIGN §7), and its checkpoint loading is not safe against crafted files.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.optim import Optimizer
from torchmetrics import Metric

from lightning_par.checkpoint.sharded import load_sharded, save_sharded
from lightning_par.data.loader import ResumableLoader
from lightning_par.distributed.layout import ParallelLayout, default_backend
from lightning_par.experts.layer import MoE
from lightning_par.fault_tolerance.watchdog import FailureWatchdog
from lightning_par.optim.gradients import GradientSync, local, optimizer_params
from lightning_par.parallelize import materialize_meta, present, tied_names
from lightning_par.pipeline.runner import PipelineRunner
from lightning_par.pipeline.schedules import check_schedule, stages_per_rank
from lightning_par.pipeline.split import plan_stages, prune_network
from lightning_par.strategies.lightning_patches import DeferredSigtermCheck
from lightning_par.tensor_parallel.styles import Replicated


class HybridParallelStrategy(ModelParallelStrategy):
    """Tensor (+ sequence), pipeline and data parallelism on one DeviceMesh, for models that follow the protocol.

    Args:
        tensor_parallel_size: ranks that split each layer. ``None``: every process not used by data or
            pipeline parallel (with ``pipeline_parallel_size=None`` too: the tp x pp preset, see
            :meth:`ParallelLayout.from_world_size`).
        data_parallel_size: model replicas. ``None``: whatever is left after tp and pp.
        pipeline_parallel_size: pipeline ranks. ``None``: whatever is left after tp and dp.
        pipeline_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"interleaved_zero_bubble"`` or
            ``"zbv"`` (torch.distributed.pipelining schedules).
        num_microbatches: microbatches per batch under pipeline parallel (the batch size must be a multiple;
            a shorter last batch is padded with ignored rows). ``None``: one per pipeline stage.
        virtual_pipeline_size: stages per rank for the interleaved schedules (``None``: 2; ZBV always 2).
        pipeline_stage_boundaries: the first layer of every stage but the first (``None``: balanced by
            parameter count, the embedding on the first stage and the head on the last counted in).
        pipeline_timeline: record each stage's forward, backward and idle time in the second training step,
            draw it as a Gantt chart (PNG in the log directory) and log it with the bubble fraction.
        expert_parallel_size: ranks that split each mixture-of-experts layer's experts, carved out of the
            data-parallel replicas (it must divide ``data_parallel_size``; see
            :class:`~lightning_par.layout.ParallelLayout`). ``None``: all of them (``ep = dp``).
        sequence_parallel: run LayerNorm, dropout and residuals on sequence shards (reduce-scatter /
            all-gather instead of all-reduce).
        tp_comm_chunks: split the batch into this many chunks inside the transformer blocks, so that one
            chunk's forward all-reduce runs while the next chunk computes (1: no split; the numbers are
            the same either way). Ignored under sequence parallel.
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
        pipeline_timeline: bool = False,
        expert_parallel_size: int | None = 1,
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
        for name, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("data_parallel_size", data_parallel_size),
            ("expert_parallel_size", expert_parallel_size),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} is not valid: it must be None or an integer >= 1.")
        if pipeline_parallel_size is not None and (
            not isinstance(pipeline_parallel_size, int)
            or isinstance(pipeline_parallel_size, bool)
            or pipeline_parallel_size < 1
        ):
            raise ValueError(
                f"pipeline_parallel_size={pipeline_parallel_size!r} is not valid: it must be None or an "
                f"integer >= 1."
            )
        # Schedule settings are checked now (Trainer(...)), against pp once the layout is known.
        known_pp = pipeline_parallel_size or 1
        default_m = known_pp * stages_per_rank(pipeline_schedule, virtual_pipeline_size)
        check_schedule(
            pipeline_schedule,
            known_pp,
            default_m if num_microbatches is None else num_microbatches,
            virtual_pipeline_size,
        )
        if not isinstance(tp_comm_chunks, int) or tp_comm_chunks < 1:
            raise ValueError(f"tp_comm_chunks={tp_comm_chunks!r} is not valid: it must be an integer >= 1.")
        self._tp_arg = tensor_parallel_size
        self._dp_arg = data_parallel_size
        self._pp_arg = pipeline_parallel_size
        self._ep_arg = expert_parallel_size
        self.sequence_parallel = sequence_parallel
        self.tp_comm_chunks = tp_comm_chunks
        self.pipeline_schedule = pipeline_schedule
        self._microbatches_arg = num_microbatches
        self.virtual_pipeline_size = virtual_pipeline_size
        self.pipeline_stage_boundaries = pipeline_stage_boundaries
        self.pipeline_timeline = pipeline_timeline
        self.layout: ParallelLayout | None = None
        self.last_grad_norm: Tensor | None = None
        self.pipeline: PipelineRunner | None = None
        self.timeline_summary: dict[str, Any] | None = None
        # Tied parameters split between pipeline ranks: (names, group of the ranks holding them).
        self._tied: list[tuple[list[str], dist.ProcessGroup]] = []
        self._stashed_grads: list[tuple[Tensor, Tensor]] = []
        self._tie_groups: list[list[str]] = []
        # Token counts of this optimizer step's micro-batches (from training_step's "num_tokens"), and
        # whether the gradients are token sums still to be divided by the global count.
        self._step_tokens: list[Tensor] = []
        self._grads_are_sums = False
        self._watchdog: FailureWatchdog | None = None
        self._sigterm_check: DeferredSigtermCheck | None = None
        # Expert parallel: the ep group (dispatch) and the group of replicas holding the same experts.
        self._ep_group: dist.ProcessGroup | None = None
        self._edp_group: dist.ProcessGroup | None = None
        self.grad_sync = GradientSync()
        """Which group each gradient is reduced over (built once the model is sharded)."""

    # ---- layout and process groups ------------------------------------------------------------------
    def _resolve_layout(self) -> ParallelLayout:
        world = self.num_processes * self.num_nodes
        layout = ParallelLayout.from_world_size(
            world,
            tensor_parallel_size=self._tp_arg,
            data_parallel_size=self._dp_arg,
            pipeline_parallel_size=self._pp_arg,
            sequence_parallel=self.sequence_parallel,
            devices_per_node=self.num_processes,
            expert_parallel_size=self._ep_arg,
        )
        if layout.pp > 1:
            check_schedule(
                self.pipeline_schedule,
                layout.pp,
                self.num_microbatches_for(layout),
                self.virtual_pipeline_size,
            )
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

    def _configure_launcher(self) -> None:
        # Runs inside Trainer(...): check the layout before any process is started.
        self.layout = self._resolve_layout()
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self._setup_distributed()
        self.layout = self._resolve_layout()
        self._device_mesh = self.layout.build_mesh(self.root_device.type)
        if self.layout.ep > 1:
            self._ep_group, self._edp_group = self.layout.expert_groups(self._device_mesh)
        elif self.layout.dp > 1:
            self._edp_group = self.dp_group  # every replica holds every expert
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or default_backend(self.root_device.type)

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.device_mesh["tp"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device_mesh["dp"].get_group()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.device_mesh["tp"].get_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.device_mesh["pp"].get_group()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.device_mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def describe_layout(self) -> dict[str, Any]:
        assert self.layout is not None
        info = self.layout.describe(backend=self._get_process_group_backend())
        if self.layout.pp > 1:
            info["pipeline_schedule"] = self.pipeline_schedule
            info["num_microbatches"] = self.num_microbatches
            info["stages_per_rank"] = stages_per_rank(self.pipeline_schedule, self.virtual_pipeline_size)
        return info

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
        assert self.model is not None and self.layout is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        layout = self.layout
        check = getattr(module, "check_layout", None)
        if check is not None:
            check(layout.tp, layout.sequence_parallel)
        if layout.pp > 1 and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} cannot be combined with pipeline "
                f"parallel: the schedule already accumulates gradients over its microbatches. Use "
                f"num_microbatches={self.num_microbatches * trainer.accumulate_grad_batches} (with a batch "
                f"{trainer.accumulate_grad_batches}x larger) and accumulate_grad_batches=1."
            )
        if getattr(module, "_lp_parallelized", False) is False:
            self._parallelize(module)
            module._lp_parallelized = True
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        for metric in module.modules():
            if isinstance(metric, Metric):
                metric.process_group = self.dp_group
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        # Lightning's clipping calls torch's clip_grad_norm_, which cannot count replicated shards once
        # (nor, later, add pipeline stages): route it through the strategy's exact global norm.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    def _parallelize(self, module: nn.Module) -> None:
        layout = self.layout
        assert layout is not None
        self._tie_groups = tied_names(module)  # before anything unties them
        if layout.pp > 1:
            self._split_pipeline(module)
        self._shard_experts(module)
        if layout.tp > 1:
            plan_fn = getattr(module, "tensor_parallel_plan", None)
            if plan_fn is None:
                raise TypeError(
                    f"tensor_parallel_size={layout.tp} needs the LightningModule to define "
                    f"`tensor_parallel_plan(sequence_parallel, comm_chunks)` (see the model protocol in the README)."
                )
            plan = present(module, plan_fn(layout.sequence_parallel, self.tp_comm_chunks))
            parallelize_module(module, self.tp_mesh, plan)
            post = getattr(module, "post_parallelize", None)
            if post is not None:
                post()  # re-tie before anything else looks at the (replaced) parameters
            # Whatever the plan did not name stays whole on every tp rank, as Replicate() DTensors.
            for sub in module.modules():
                if any(not isinstance(p, DTensor) for p in sub.parameters(recurse=False)):
                    Replicated(sequence_parallel=layout.sequence_parallel)._apply(sub, self.tp_mesh)
        if any(p.device.type == "meta" for p in module.parameters()):
            materialize_meta(module, self.root_device)
            init = getattr(module, "init_weights", None)
            if init is None:
                raise TypeError("The model was built on meta but has no `init_weights()` to fill it.")
            init()
        moe = [m for m in module.modules() if isinstance(m, MoE)]
        self.grad_sync = GradientSync(
            tp=self.tp_group if layout.tp > 1 else None,
            dp=self.dp_group if layout.dp > 1 else None,
            edp=self._edp_group,
            ep=self._ep_group,
            pp=self.pp_group if layout.pp > 1 else None,
            sequence_parallel=layout.sequence_parallel,
            expert_ids={id(p) for m in moe for p in m.experts.parameters()},
            moe_ids={id(p) for m in moe for p in m.parameters()},
            tied=self._tied,
            norm_duplicates=self._tied_copies(module),
        )

    def _shard_experts(self, module: nn.Module) -> None:
        """Keep this rank's block of every MoE layer's experts (still on meta) and wire the ep group."""
        layout = self.layout
        assert layout is not None
        ep_rank = self.device_mesh["dp"].get_local_rank() % layout.ep
        for m in module.modules():
            if isinstance(m, MoE):
                m.shard_experts(self._ep_group, ep_rank, layout.ep)
                if layout.sequence_parallel:
                    m.sequence_parallel_group = self.tp_group

    # ---- pipeline parallel ----------------------------------------------------------------------------
    def _split_pipeline(self, module: nn.Module) -> None:
        """Keep only this rank's stages of the network (still on meta) and build the runner.

        Parameters tied across stages that end up on different ranks (the GPT embedding and head) become
        one copy per rank; :meth:`reduce_gradients` sums their gradients over the ranks that hold them.
        """
        layout = self.layout
        assert layout is not None
        network = getattr(module, "model", None)
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"pipeline_parallel_size={layout.pp} needs the LightningModule to keep its network in "
                f"`self.model` (built in configure_model) following the model protocol (see the README)."
            )
        pp_rank = self.device_mesh["pp"].get_local_rank()
        plans = [
            plan_stages(
                network,
                self.pipeline_schedule,
                layout.pp,
                r,
                self.virtual_pipeline_size,
                self.pipeline_stage_boundaries,
            )
            for r in range(layout.pp)
        ]
        prune_network(network, plans[pp_rank])
        self._tied = []
        for names in self._tie_groups:
            holders = sorted(
                {
                    r
                    for r in range(layout.pp)
                    for n in names
                    if n.startswith("model.") and plans[r].keeps(n[6:])
                }
            )
            if len(holders) < 2:
                continue
            group = self._stage_group(holders)
            if group is not None:
                self._tied.append((names, group))
        self.pipeline = PipelineRunner(
            network,
            plans[pp_rank],
            self.pipeline_schedule,
            self.num_microbatches,
            self.pp_group,
            self._stage_group(list(range(layout.pp))),
            self.root_device,
            dp_group=self.dp_group if layout.dp > 1 else None,
        )

    def _stage_group(self, pp_ranks: list[int]) -> dist.ProcessGroup | None:
        """A new process group over ``pp_ranks`` of this rank's model replica (``None`` if it is not in them).

        Every rank takes part in creating the group of every (dp, tp) position, as ``new_group`` requires.
        """
        layout = self.layout
        assert layout is not None
        mesh = self.device_mesh.mesh  # [pp, dp, tp] global ranks
        mine = None
        for d in range(layout.dp):
            for t in range(layout.tp):
                ranks = [int(mesh[r, d, t]) for r in pp_ranks]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = group
        return mine

    def _tied_copies(self, module: nn.Module) -> set[int]:
        """Ids of this rank's copies of tied parameters whose first name lives on another rank.

        Those copies hold the same numbers as the first one, so the gradient norm counts them once.
        """
        params = dict(module.named_parameters())
        return {
            id(params[n])
            for names, _ in self._tied
            for n in names[1:]
            if n in params and names[0] not in params
        }

    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Under pipeline parallel the schedule already ran every backward: only the hooks run here."""
        if self.pipeline is None:
            accumulate = self.lightning_module.trainer.accumulate_grad_batches
            if self._step_tokens and (accumulate > 1 or self.layout.dp > 1):
                # Lightning's closure gave mean / accumulate; make it this micro-batch's token sum, so the
                # step's gradient can be divided by the tokens of the whole global batch (reduce_gradients):
                # exact however the counted tokens are spread over micro-batches and replicas.
                closure_loss = closure_loss * (self._step_tokens[-1] * accumulate)
                self._grads_are_sums = True
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        assert self.lightning_module is not None
        for p, grad in self._stashed_grads:
            p.grad = grad if p.grad is None else p.grad.add_(grad)  # after earlier runs of the step
        self._stashed_grads = []
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # The timeline is taken at the second step (the first also builds the stages), or the only one.
        timeline_step = 0 if self.lightning_module.trainer.max_steps in (0, 1) else 1
        record = (
            self.pipeline is not None
            and self.pipeline_timeline
            and self.lightning_module.global_step == timeline_step
        )
        if self.pipeline is not None:
            self.pipeline.record_timeline = record
            # fp16: the schedule's backward must see the scaled loss (the plugin's pre_backward comes too late).
            self.pipeline.grad_scale = getattr(self.precision_plugin, "loss_scale", None)
        automatic = self.pipeline is not None and self.lightning_module.automatic_optimization
        # Several pipeline runs per optimizer step (GlobalBatchSize's ramp-up): the runs leave token sums,
        # added up here and divided by the step's global token count in reduce_gradients.
        accumulating = automatic and self.lightning_module.trainer.accumulate_grad_batches > 1
        if self.pipeline is not None:
            self.pipeline.token_sums = accumulating
        earlier: list[tuple[Tensor, Tensor | None]] = []
        if automatic:
            # The schedule accumulates into .grad during training_step, before Lightning's zero_grad.
            if accumulating:  # the gradients of this step's earlier runs wait aside
                earlier = [(p, p.grad) for p in self.lightning_module.parameters()]
            for p in self.lightning_module.parameters():
                p.grad = None
        out = super().training_step(*args, **kwargs)
        if isinstance(out, dict) and isinstance(out.get("num_tokens"), Tensor):
            self._step_tokens.append(out["num_tokens"].detach())
        if automatic:
            # Lightning zeroes gradients between training_step and backward; the schedule has already
            # made them, so they wait aside until backward() puts them back. (With manual optimization
            # the user's manual_backward() comes after the schedule inside training_step: nothing to do.)
            self._stashed_grads = [
                (p, p.grad) for p in self.lightning_module.parameters() if p.grad is not None
            ]
            for p, _ in self._stashed_grads:
                p.grad = None
            for p, grad in earlier:
                p.grad = grad
            self._grads_are_sums = accumulating
        if record:
            self.pipeline.record_timeline = False
            self._report_timeline()
        return out

    def _report_timeline(self) -> None:
        from lightning_par.pipeline.timeline import draw_timeline, summarize_timeline

        assert self.pipeline is not None and self.layout is not None
        events: list[Any] = [None] * self.layout.pp
        dist.all_gather_object(events, self.pipeline.last_timeline or [], group=self.pp_group)
        v = stages_per_rank(self.pipeline_schedule, self.virtual_pipeline_size)
        summary = summarize_timeline(events, self.layout.pp, self.num_microbatches, v)
        summary["schedule"] = self.pipeline_schedule
        self.timeline_summary = summary
        trainer = self.lightning_module.trainer
        directory = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
        if dist.get_rank() != 0:
            return
        path = draw_timeline(events, summary, f"{directory}/pipeline_timeline.png")
        summary["png"] = path
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "pipeline/bubble_measured": summary["bubble_measured"],
                    "pipeline/bubble_theory": summary["bubble_theory"],
                },
                step=trainer.global_step,
            )
            log_image = getattr(logger, "log_image", None)
            if log_image is not None:
                caption = (
                    f"{self.pipeline_schedule}: bubble {summary['bubble_measured']:.3f} measured, "
                    f"{summary['bubble_theory']:.3f} theory"
                )
                log_image("pipeline/timeline", images=[path], caption=[caption], step=trainer.global_step)

    def process_dataloader(self, dataloader: object) -> object:
        """Refuse, before the first step, a batch size that does not split into the microbatches."""
        batch_size = getattr(dataloader, "batch_size", None)
        if self.pipeline is not None and isinstance(batch_size, int) and batch_size % self.num_microbatches:
            m = self.num_microbatches
            raise ValueError(
                f"batch size {batch_size} (per data-parallel rank) is not divisible by num_microbatches={m}; "
                f"use a batch size that is a multiple of {m} (e.g. {max(m, batch_size - batch_size % m)}) or a "
                f"num_microbatches that divides {batch_size}."
            )
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if (
            trainer is not None
            and trainer.training
            and hasattr(dataloader, "batch_sampler")
            and getattr(dataloader, "batch_sampler", None) is not None
            and not hasattr(dataloader, "state_dict")
        ):
            # Checkpoints record how far into the epoch training got, so a resume continues from there.
            loop = trainer.fit_loop.epoch_loop
            dataloader = ResumableLoader(dataloader, position=lambda: loop.batch_progress.current.processed)
        return super().process_dataloader(dataloader)

    # ---- the optimizer step ------------------------------------------------------------------------
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        def closure_and_reduce() -> Any:
            result = closure()
            self.reduce_gradients(optimizer_params(optimizer))
            return result

        return super().optimizer_step(optimizer, closure_and_reduce, model, **kwargs)

    @torch.no_grad()
    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        """Make every gradient that of the token-weighted mean loss of the whole global batch.

        All micro-batches of the step, all replicas: see :class:`~lightning_par.gradients.GradientSync`
        for which group each kind of parameter is reduced over. One flat bucket per collective.
        """
        assert self.layout is not None
        scale = None
        if self._grads_are_sums:
            # Token sums of every micro-batch on every replica: divide by the global batch's tokens.
            total = torch.stack(self._step_tokens).sum().to(torch.float64)
            if self.layout.dp > 1:
                dist.all_reduce(total, group=self.dp_group)
            scale = 1.0 / float(total.clamp(min=1))
        elif self.layout.dp > 1:
            # Under pipeline parallel each replica already divided by the global batch's tokens: sum.
            scale = 1.0 if self.pipeline is not None else 1.0 / self.layout.dp
        self._step_tokens, self._grads_are_sums = [], False
        named = dict(self.lightning_module.named_parameters()) if self.grad_sync.tied else {}
        self.grad_sync.reduce(params, named, scale)

    def global_grad_norm(self, params: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
        """The gradient norm of the whole (unsharded) model, each parameter counted once."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type={norm_type} is not supported: only the L2 norm (2.0) is.")
        return self.grad_sync.norm(params, self.root_device)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float | int) -> None:
        params = list(optimizer_params(optimizer))
        total = self.global_grad_norm(params)
        self.last_grad_norm = total
        coef = (float(clip_val) / (total + 1e-6)).clamp(max=1.0)
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))

    # ---- checkpoints ----------------------------------------------------------------------------------
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
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        checkpoint["parallel_layout"] = self.describe_layout()
        path = Path(self.broadcast(str(filepath)))
        save_sharded(path, self.lightning_module, self._raw_optimizers(), checkpoint, self.global_rank)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint written on any layout; nothing in its files is run (see the module)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        aliases = {n: names[0] for names in self._tie_groups for n in names[1:]}
        return load_sharded(path, self.lightning_module, self._raw_optimizers(), aliases)

    def _raw_optimizers(self) -> list[Optimizer]:
        return [getattr(o, "_optimizer", o) for o in self.optimizers]

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """A decision every rank agrees on (over the whole world: tp and pp peers too, not only dp)."""
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN if all else dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- failures -----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        # From here on a rank that fails ends the others within seconds, whatever they are blocked in.
        if self.world_size > 1 and dist.is_initialized():
            self._watchdog = FailureWatchdog.for_process_group(self.global_rank)
            if self._watchdog is not None:
                self._watchdog.start()
        if self.layout is not None and self.layout.pp > 1 and self.world_size > 1:
            # No barrier at the start of each step: pipeline ranks overlap one step's end with the next.
            if self._sigterm_check is None:
                self._sigterm_check = DeferredSigtermCheck()
            self._sigterm_check.install(self.lightning_module.trainer)

    def on_train_end(self) -> None:
        self._stop_watchdog()
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        if self._watchdog is not None:
            self._watchdog.report(exception)
        super().on_exception(exception)

    def teardown(self) -> None:
        self._stop_watchdog()
        super().teardown()

    def _stop_watchdog(self) -> None:
        if self._sigterm_check is not None:
            self._sigterm_check.uninstall()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    # ---- logging --------------------------------------------------------------------------------------
    def sum_over_replicas_and_stages(self, tensor: Tensor) -> Tensor:
        """Sum a statistic over data-parallel replicas and pipeline stages (tp peers hold the same one)."""
        assert self.layout is not None
        out = tensor.detach().clone()
        if self.layout.dp > 1:
            dist.all_reduce(out, group=self.dp_group)
        if self.layout.pp > 1:
            dist.all_reduce(out, group=self.pp_group)
        return out

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce a logged value over data-parallel ranks only (tp/pp peers hold the same number)."""
        if not isinstance(tensor, Tensor) or self._device_mesh is None or self.layout is None:
            return tensor
        if self.layout.dp == 1 and group is None:
            return tensor
        group = self.dp_group if group is None else group
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
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            pipeline_parallel_size=1,
            sequence_parallel=sequence_parallel,
            tp_comm_chunks=tp_comm_chunks,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )


class PipelineParallelStrategy(HybridParallelStrategy):
    """Pipeline parallel (torch.distributed.pipelining schedules) composed with data parallel.

    ``Trainer(strategy="pp", devices=N)`` means pp=N with 1F1B and one microbatch per stage;
    ``PipelineParallelStrategy(pipeline_parallel_size=2, pipeline_schedule="zbv", num_microbatches=8)``
    sets them explicitly (data parallel takes the remaining processes).
    """

    def __init__(
        self,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        pipeline_schedule: str = "1f1b",
        num_microbatches: int | None = None,
        virtual_pipeline_size: int | None = None,
        pipeline_stage_boundaries: list[int] | None = None,
        pipeline_timeline: bool = False,
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
            pipeline_timeline=pipeline_timeline,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )


class ExpertParallelStrategy(HybridParallelStrategy):
    """Expert parallel for mixture-of-experts models, with data parallel over the same ranks.

    ``Trainer(strategy="ep", devices=N)``: each MoE layer's experts are split over the N ranks (N must
    divide ``num_experts``), every dense parameter is replicated over them (data parallel), and each rank
    reads its own share of the data. ``ExpertParallelStrategy(expert_parallel_size=2, data_parallel_size=4)``
    keeps two copies of every expert (see :class:`~lightning_par.layout.ParallelLayout` for the rule).
    """

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        tensor_parallel_size: int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            pipeline_parallel_size=1,
            expert_parallel_size=expert_parallel_size,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
