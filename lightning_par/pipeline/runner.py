"""Running whole batches through this rank's stages with torch's pipelining schedules."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
)
from torch.distributed.pipelining.microbatch import TensorChunkSpec

from lightning_par.pipeline.schedules import IGNORE_INDEX, SCHEDULES, stage_placement
from lightning_par.pipeline.split import StagePlan, plan_views
from lightning_par.protocols import AuxLossLayer


# ---- running a schedule ------------------------------------------------------------------------------
@dataclass
class TimelineEvent:
    kind: str  # "F", "B" (full or input backward), "W" (weight backward)
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class _Entry:
    stages: list[PipelineStage]
    schedule: Any
    events: list[TimelineEvent] = field(default_factory=list)


class PipelineRunner:
    """Runs whole batches through this rank's stages with one of torch's schedules.

    Args:
        network: the (pruned) network; its ``loss_fn(output, labels) -> (loss_sum, num_tokens)`` gives the
            loss on the last stage, and ``count_loss_tokens(labels)`` (optional) the number of tokens it
            counts, so every microbatch's loss can be divided by the whole batch's count.
        plan: this rank's stages.
        schedule: a name from :data:`SCHEDULES`.
        num_microbatches: microbatches per batch.
        group: the pipeline process group (ranks that hold the other stages of this model replica).
        loss_group: a second group over the same ranks. The last stage broadcasts the batch's loss on it
            as soon as its last microbatch's loss is known, in the background, rather than in a collective
            after the schedule: ranks that finish early go on (to the optimizer step, to the next step's
            first forwards) without waiting for another's last backward. Under ZBV, whose last stage
            shares rank 0 with the first, that wait was 0.15 s of a 2.4 s step. Layers with auxiliary
            losses (MoE) still sum theirs over ``group`` after the schedule.
        device: the device the stages compute on.
        output_batch_dim: the batch dimension of the last stage's output; ``None``: the network's
            ``output_batch_dim`` attribute, else 1 (sequence-first activations).
        max_cached_shapes: schedules kept per mode; a batch of a new shape builds new stages.
        dp_group: the data-parallel group; training losses are divided by the tokens of the global batch
            (summed over it), so replicas' gradients are then summed, not averaged.
    """

    def __init__(
        self,
        network: nn.Module,
        plan: StagePlan,
        schedule: str,
        num_microbatches: int,
        group: dist.ProcessGroup,
        loss_group: dist.ProcessGroup,
        device: torch.device,
        output_batch_dim: int | None = None,
        max_cached_shapes: int = 4,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.network = network
        self.plan = plan
        self.schedule_name = schedule
        self.num_microbatches = num_microbatches
        self.group = group
        self.device = device
        if output_batch_dim is None:
            output_batch_dim = getattr(network, "output_batch_dim", 1)
        self.output_batch_dim = output_batch_dim
        self.max_cached_shapes = max_cached_shapes
        self.dp_group = dp_group
        self.views = plan_views(network, plan)
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        # Modules with auxiliary losses (``aux_grad_scale``, ``pop_aux``, ``record``: MoE layers).
        self._aux_modules = [m for m in network.modules() if isinstance(m, AuxLossLayer)]
        any_aux = torch.tensor([float(bool(self._aux_modules))], device=device)
        dist.all_reduce(any_aux, group=group)
        self._any_aux = bool(any_aux.item())
        """Whether a layer on any pp rank has auxiliary losses (summed over ``group`` after each run)."""
        self.loss_group = loss_group
        self._token_losses: list[Tensor] = []
        """The last stage's per-microbatch token-loss sums of the current run."""
        self._real_forward_done = False
        self._loss_broadcast: tuple[Tensor, Any] | None = None
        self._loss_scale: Tensor | None = None
        self.record_timeline = False
        self.around_weight_pass: Callable[[nn.Module, Callable[[], Any]], Any] | None = None
        """Runs a zero-bubble weight pass (``stage.submod``, the call): whoever waits for final gradients
        learns of those it wrote into ``.grad`` directly, without the post-accumulate-grad hooks."""
        """Time every stage call of the next runs (``lightning_par.callbacks.PipelineTimeline`` sets it)."""
        self.grad_scale: float | None = None
        self.token_sums = False
        self.last_timeline: list[TimelineEvent] | None = None
        # The pp rank that holds the last stage broadcasts the loss (rank 0 under ZBV's V shape).
        last_owner = next(
            r
            for r, stages in enumerate(
                stage_placement(schedule, dist.get_world_size(group), len(plan.stages))
            )
            if plan.num_stages - 1 in stages
        )
        self.last_stage_rank = dist.get_global_rank(group, last_owner)

    def prepare_step(self, grad_scale: float | None, token_sums: bool) -> None:
        """Settings of the coming training step (the strategy calls this before ``training_step``).

        Args:
            grad_scale: the fp16 loss scale, which multiplies each microbatch loss before its backward
                (``None``: no scaling).
            token_sums: leave gradients as token sums, not divided by the batch's tokens: the strategy
                divides them by the tokens of a step that accumulates several pipeline runs.
        """
        self.grad_scale = grad_scale
        self.token_sums = token_sums

    # ---- public entry points -------------------------------------------------------------------------
    def loss(
        self, args: Sequence[Tensor], labels: Tensor, kwargs: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loss_sum, num_tokens)`` of the whole batch, the same on every pp rank.

        ``args`` enter the first stage; ``kwargs`` (``[batch, ...]`` tensors such as a padding mask) reach
        every stage's ``forward`` as keyword arguments, split into the same microbatches (every pp rank
        has the whole batch, so nothing extra is sent between stages).

        In training mode with gradients enabled the schedule also runs every backward, leaving in this
        rank's parameters the gradients of ``loss_sum / global_tokens``, where ``global_tokens`` counts the
        batches of every data-parallel replica (so replicas' gradients are summed, not averaged).
        """
        train = torch.is_grad_enabled() and self.network.training
        args, labels, kwargs, _ = self._pad(list(args), labels, kwargs)
        num_tokens = self._count_tokens(labels)
        global_tokens = num_tokens.to(torch.float32)
        sums = train and self.token_sums
        if train and self.dp_group is not None and not sums:
            global_tokens = global_tokens.clone()
            dist.all_reduce(global_tokens, group=self.dp_group)
        grad_scale = self.grad_scale if train and self.grad_scale else 1.0
        divisor = torch.ones(()) if sums else global_tokens.clamp(min=1)
        self._loss_scale = grad_scale / divisor
        entry = self._entry("train" if train else "eval", args, labels, kwargs)
        call = entry.schedule.step if train else entry.schedule.eval
        options: dict[str, Any] = {"target": labels if self.plan.has_last else None}
        if train:
            options["return_outputs"] = False
        # Auxiliary losses of layers on any stage (MoE load balancing) get their gradient injected in
        # backward with the same scale as the token loss.
        for m in self._aux_modules:
            m.aux_grad_scale = self._loss_scale if train else None
        self._token_losses = []
        self._loss_broadcast = None
        if not self.plan.has_last:  # (the last stage posts its side in _loss_fn)
            self._post_loss(torch.zeros((), device=self.device))
        try:
            self._run(entry, call, args, options, kwargs)
        finally:
            for m in self._aux_modules:
                m.aux_grad_scale = None
        if self._loss_broadcast is None:  # (not posted in _loss_fn: fewer losses than microbatches)
            self._post_loss(self._token_loss_sum())
        assert self._loss_broadcast is not None
        loss_sum, work = self._loss_broadcast
        work.wait()
        # The token loss lives on the last stage, aux losses on every stage that has aux-loss layers.
        if self._any_aux:
            aux = [a for m in self._aux_modules if (a := m.pop_aux()) is not None]
            aux_sum = (
                torch.stack(aux).sum().float().to(self.device) if aux else torch.zeros((), device=self.device)
            )
            dist.all_reduce(aux_sum, group=self.group)
            loss_sum = loss_sum + aux_sum
        return loss_sum, num_tokens.to(self.device, torch.float32)

    @torch.no_grad()
    def forward(self, args: Sequence[Tensor], kwargs: Mapping[str, Tensor] | None = None) -> Tensor:
        """The last stage's output for the whole batch (forward only), returned on every pp rank."""
        args, _, kwargs, real_rows = self._pad(list(args), None, kwargs)
        entry = self._entry("predict", args, None, kwargs)
        output = self._run(entry, entry.schedule.eval, args, {}, kwargs)
        meta = torch.zeros(8, dtype=torch.int64, device=self.device)
        if self.plan.has_last:
            meta[0] = output.ndim
            meta[1 : 1 + output.ndim] = torch.tensor(output.shape)
            meta[7] = _DTYPES.index(output.dtype)
        dist.broadcast(meta, src=self.last_stage_rank, group=self.group)
        if not self.plan.has_last:
            shape = meta[1 : 1 + int(meta[0])].tolist()
            output = torch.empty(shape, dtype=_DTYPES[int(meta[7])], device=self.device)
        output = output.contiguous()
        dist.broadcast(output, src=self.last_stage_rank, group=self.group)
        return output.narrow(self.output_batch_dim, 0, real_rows)

    # ---- internals ---------------------------------------------------------------------------------
    def _run(
        self, entry: _Entry, call: Callable, args: list[Tensor], options: dict, kwargs: dict[str, Tensor]
    ) -> Any:
        entry.events.clear()
        # A stage's first call infers shapes with a forward on placeholder data: aux-loss layers record
        # only inside the real forward calls (see _instrument).
        for m in self._aux_modules:
            m.record = False
        # Keyword inputs go to the schedule on every rank: torch passes them to each stage's forward.
        result = call(*(args if self.plan.has_first else ()), **kwargs, **options)
        if self.record_timeline:
            self.last_timeline = list(entry.events)
        for stage in entry.stages:  # free the microbatch outputs and activations kept for the next step
            stage.clear_runtime_states()
        for m in self._aux_modules:
            m.record = True
        return result

    def _count_tokens(self, labels: Tensor) -> Tensor:
        count = getattr(self.network, "count_loss_tokens", None)
        return count(labels) if count is not None else (labels != IGNORE_INDEX).sum()

    def _pad(
        self, args: list[Tensor], labels: Tensor | None, kwargs: Mapping[str, Tensor] | None
    ) -> tuple[list[Tensor], Tensor | None, dict[str, Tensor], int]:
        """Pad the batch to a multiple of ``num_microbatches`` rows (a short last batch).

        Padded rows have token 0 and ignored labels: they add nothing to the loss or the gradients.
        Keyword inputs repeat the last real row, so a padding mask stays valid (a row that masks every
        key would make attention NaN, and NaN times an ignored label is still NaN).
        """
        kwargs = dict(kwargs or {})
        rows = args[0].shape[0]
        m = self.num_microbatches
        extra = -rows % m
        if extra:
            args = [torch.cat([a, a.new_zeros((extra, *a.shape[1:]))]) for a in args]
            if labels is not None:
                labels = torch.cat([labels, labels.new_full((extra, *labels.shape[1:]), IGNORE_INDEX)])
            kwargs = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) for k, v in kwargs.items()}
        return args, labels, kwargs, rows

    def _entry(
        self, mode: str, args: list[Tensor], labels: Tensor | None, kwargs: Mapping[str, Tensor]
    ) -> _Entry:
        key = (
            mode,
            torch.is_inference_mode_enabled(),
            tuple((tuple(a.shape), a.dtype) for a in args),
            None if labels is None else tuple(labels.shape),
            tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items())),
        )
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry
        # Every pp rank sees batches of the same shapes in the same order, so all build and evict alike.
        stages = [
            PipelineStage(self.views[s], s, self.plan.num_stages, self.device, group=self.group)
            for s in self.plan.stages
        ]
        entry = _Entry(stages=stages, schedule=None)
        for stage in stages:
            self._instrument(stage, entry)
        cls = SCHEDULES[self.schedule_name]
        loss_fn = None if mode == "predict" else self._loss_fn
        kw: dict[str, Any] = {
            "n_microbatches": self.num_microbatches,
            "loss_fn": loss_fn,
            "output_merge_spec": TensorChunkSpec(self.output_batch_dim),
            "scale_grads": False,
        }
        entry.schedule = cls(stages if len(stages) > 1 else stages[0], **kw)
        self._cache[key] = entry
        while sum(1 for k in self._cache if k[0] == mode) > self.max_cached_shapes:
            oldest = next(k for k in self._cache if k[0] == mode)
            del self._cache[oldest]
        return entry

    def _loss_fn(self, output: Tensor, labels: Tensor) -> Tensor:
        loss_sum, _ = self.network.loss_fn(output, labels)
        # (A stage's first call also runs the loss on placeholder tensors, to infer gradient shapes.)
        if self._real_forward_done:
            self._real_forward_done = False
            self._token_losses.append(loss_sum.detach())
            if len(self._token_losses) == self.num_microbatches:
                self._post_loss(self._token_loss_sum())  # the batch's loss is known: send it now
        assert self._loss_scale is not None
        return loss_sum * self._loss_scale.to(loss_sum.device)

    def _token_loss_sum(self) -> Tensor:
        if not self._token_losses:
            return torch.zeros((), device=self.device)
        return torch.stack([t.float() for t in self._token_losses]).sum().to(self.device)

    def _post_loss(self, value: Tensor) -> None:
        """Start the broadcast of the batch's token loss from the last stage over ``loss_group``."""
        value = value.clone()
        work = dist.broadcast(value, src=self.last_stage_rank, group=self.loss_group, async_op=True)
        self._loss_broadcast = (value, work)

    def _instrument(self, stage: PipelineStage, entry: _Entry) -> None:
        """Time this stage's forward and backward calls when ``record_timeline`` is on, and let aux-loss
        layers and the token loss record only after real forward calls (not the shape inference of a
        stage's first call, which runs forward, loss and backward on placeholder tensors)."""

        def wrap(name: str, kind: str) -> None:
            inner = getattr(stage, name)

            def clock(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
                if not self.record_timeline:
                    return inner(chunk_id, *args, **kwargs)
                start = time.time()  # wall clock: comparable between processes
                try:
                    return inner(chunk_id, *args, **kwargs)
                finally:
                    entry.events.append(TimelineEvent(kind, stage.stage_index, chunk_id, start, time.time()))

            def timed(chunk_id: int, *args: Any, **kwargs: Any) -> Any:
                if kind == "W" and self.around_weight_pass is not None:
                    run = lambda: clock(chunk_id, *args, **kwargs)  # noqa: E731
                    return self.around_weight_pass(stage.submod, run)
                if kind != "F":
                    return clock(chunk_id, *args, **kwargs)
                for m in self._aux_modules:
                    m.record = True
                try:
                    out = clock(chunk_id, *args, **kwargs)
                finally:
                    for m in self._aux_modules:
                        m.record = False
                self._real_forward_done = stage.is_last  # the loss of this microbatch comes next
                return out

            setattr(stage, name, timed)

        wrap("forward_one_chunk", "F")
        wrap("backward_one_chunk", "B")
        wrap("backward_weight_one_chunk", "W")


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
