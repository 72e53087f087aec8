"""The ordered model surgery that turns a protocol LightningModule into this rank's shard of it.

:func:`parallelize` runs once per run, at setup, on a model still on the meta device:

1. **tie**: note which parameter names share one tensor (anything below replaces parameters);
2. **pipeline cut** (pp > 1): keep this rank's stages (:mod:`lightning_par.pipeline.split`), make the
   groups of ranks that hold copies of a weight tied across stages, build the :class:`PipelineRunner`;
3. **experts**: each MoE layer keeps this rank's block of experts and dispatches over the ep group;
4. **tensor parallel** (tp > 1): the module's plan, with the performance options applied here (the
   model's plan only says what is split how), through torch's ``parallelize_module``; the module re-ties
   (``post_parallelize``); everything the plan did not name becomes ``Replicate()`` on the tp mesh;
5. **materialise and init**: real storage for meta tensors, then the module's ``init_weights`` (the same
   numbers on every layout);
6. **activation recomputation** (``activation_checkpointing``): the blocks this rank runs get a forward
   that keeps less for backward (:mod:`lightning_par.memory.recompute`); last of the module changes, so
   the tensor-parallel plan and the names saw the blocks as they are, and after the pipeline's stage
   views exist (a stage holding half a block runs a copy of it, recomputed on its own);
7. **gradient plan**: which group each parameter's gradient is reduced over (:class:`GradientSync`).

The result (:class:`Parallelized`) is what the strategy keeps. Nothing here knows about Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from lightning_par.distributed.groups import ParallelGroups
from lightning_par.distributed.layout import ParallelLayout
from lightning_par.experts.layer import MoE
from lightning_par.memory.recompute import apply_activation_checkpointing, check_recompute
from lightning_par.optim.gradients import GradientSync
from lightning_par.pipeline.runner import PipelineRunner
from lightning_par.pipeline.schedules import PipelineConfig
from lightning_par.pipeline.split import plan_stages, prune_network
from lightning_par.tensor_parallel.styles import Replicated, TPStyle


@dataclass
class Parallelized:
    """What the surgery leaves for the training step."""

    grad_sync: GradientSync
    pipeline: PipelineRunner | None = None
    tie_groups: list[list[str]] = field(default_factory=list)
    """Parameter names that shared one tensor before the surgery (the first name is the checkpoint's)."""


def parallelize(
    module: nn.Module,
    layout: ParallelLayout,
    groups: ParallelGroups,
    device: torch.device,
    pipeline: PipelineConfig | None = None,
    tp_comm_chunks: int = 1,
    activation_checkpointing: str | None = None,
    recompute_num_layers: int | None = None,
) -> Parallelized:
    """Shard ``module`` in place for ``layout`` (see the module docstring for the order and why).

    ``activation_checkpointing`` (``None``, ``"full"`` or ``"selective"``) and ``recompute_num_layers``
    (the first layers of each pipeline stage; ``None``: all) are those of
    :func:`~lightning_par.memory.recompute.apply_activation_checkpointing`.
    """
    check_recompute(activation_checkpointing, recompute_num_layers, tp_comm_chunks if layout.tp > 1 else 1)
    tie_groups = tied_names(module)  # before anything unties them
    runner, tied = None, []
    if layout.pp > 1:
        assert pipeline is not None
        runner, tied = cut_pipeline(module, layout, groups, device, pipeline, tie_groups)
    shard_experts(module, layout, groups)
    if layout.tp > 1:
        apply_tensor_parallel(module, layout, groups, tp_comm_chunks)
    if any(p.device.type == "meta" for p in module.parameters()):
        materialize_meta(module, device)
        module.init_weights()
    views = runner.views if runner is not None else None
    apply_activation_checkpointing(module, activation_checkpointing, recompute_num_layers, views)
    moe = [m for m in module.modules() if isinstance(m, MoE)]
    params = dict(module.named_parameters())
    grad_sync = GradientSync(
        tp=groups.tp,
        dp=groups.dp,
        edp=groups.edp,
        ep=groups.ep,
        pp=groups.pp,
        sequence_parallel=layout.sequence_parallel,
        expert_ids={id(p) for m in moe for p in m.experts.parameters()},
        moe_ids={id(p) for m in moe for p in m.parameters()},
        tied=tied,
        # This rank's copies of tied weights whose first name lives on another rank: the same numbers as
        # that one, so the gradient norm counts them once.
        norm_duplicates={
            id(params[n]) for names, _ in tied for n in names[1:] if n in params and names[0] not in params
        },
    )
    return Parallelized(grad_sync=grad_sync, pipeline=runner, tie_groups=tie_groups)


def cut_pipeline(
    module: nn.Module,
    layout: ParallelLayout,
    groups: ParallelGroups,
    device: torch.device,
    config: PipelineConfig,
    tie_groups: list[list[str]],
) -> tuple[PipelineRunner, list[tuple[list[str], Any]]]:
    """Keep only this rank's stages of ``module.model`` (still on meta) and build the runner.

    Parameters tied across stages that end up on different ranks (the GPT embedding and head) become one
    copy per rank; the returned ``(names, group)`` pairs say over which ranks their gradients are summed.
    """
    network = module.model
    plans = [
        plan_stages(
            network,
            config.schedule,
            layout.pp,
            r,
            config.virtual_pipeline_size,
            config.stage_boundaries,
        )
        for r in range(layout.pp)
    ]
    prune_network(network, plans[groups.pp_rank])
    tied = []
    for names in tie_groups:
        holders = sorted(
            {r for r in range(layout.pp) for n in names if n.startswith("model.") and plans[r].keeps(n[6:])}
        )
        if len(holders) < 2:
            continue
        group = groups.stage_group(holders)
        if group is not None:
            tied.append((names, group))
    runner = PipelineRunner(
        network,
        plans[groups.pp_rank],
        config.schedule,
        config.num_microbatches,
        groups.group("pp"),
        groups.stage_group(list(range(layout.pp))),
        device,
        dp_group=groups.dp,
    )
    return runner, tied


def shard_experts(module: nn.Module, layout: ParallelLayout, groups: ParallelGroups) -> None:
    """Keep this rank's block of every MoE layer's experts (still on meta) and wire the ep group."""
    for m in module.modules():
        if isinstance(m, MoE):
            m.shard_experts(groups.ep, groups.ep_rank, layout.ep)
            if layout.sequence_parallel:
                m.sequence_parallel_group = groups.tp


def apply_tensor_parallel(
    module: nn.Module, layout: ParallelLayout, groups: ParallelGroups, comm_chunks: int
) -> None:
    """The module's plan with this run's options, then ``Replicate()`` for whatever the plan left out."""
    tp_mesh = groups.mesh["tp"]
    plan = present(module, module.tensor_parallel_plan(layout.sequence_parallel))
    for style in plan.values():
        if isinstance(style, TPStyle):
            style.comm_chunks = comm_chunks  # a speed option of the run, not of the model
    parallelize_module(module, tp_mesh, plan)
    post = getattr(module, "post_parallelize", None)
    if post is not None:
        post()  # re-tie before anything else looks at the (replaced) parameters
    for sub in module.modules():
        if any(not isinstance(p, DTensor) for p in sub.parameters(recurse=False)):
            Replicated(sequence_parallel=layout.sequence_parallel)._apply(sub, tp_mesh)


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
