"""Pipeline parallelism: split a protocol model into stages and run torch's pipelining schedules on them.

Where this sits in the flow (``pipeline_parallel_size > 1``):

1. The strategy checks the schedule settings (:func:`check_schedule`) at ``Trainer(...)``.
2. At setup, on the meta device, :func:`split_layers` assigns the model's layers to the global stages
   (balanced by parameter count, the first stage also holding the embedding, the last the final norm,
   head and loss), :func:`stage_placement` says which stages this pp rank runs (looped for plain and
   interleaved schedules, V-shaped for ZBV), and :func:`prune_network` deletes what this rank does not
   own. Parameter names stay global (``layers.7...`` on whichever rank owns layer 7). Blocks that name
   their halves (``PARTS``: attention and MLP) may be cut between them, so a stage can end after the
   attention of a layer and the next begin with its MLP: with whole layers only, the head on the last
   stage leaves the stages unequal (8 layers and a 4096-word head at pp=2: 4 layers against 4.6).
3. Tensor parallel is applied to what is left, exactly as without pipeline.
4. Each step, :class:`PipelineRunner` runs the batch through ``torch.distributed.pipelining``: one
   ``PipelineStage`` per local stage (a view sharing the network's modules) and the named schedule.

What is ours and why (the rest is torch's): stage views over one network, so the LightningModule keeps a
single model with global names; a schedule per batch shape (torch's stages infer shapes on their first
step and keep them, so a validation batch of another length would break a training stage); padding of a
short last batch to whole microbatches with ignored labels (the token-weighted loss does not change);
the loss scaled by the whole batch's token count, and broadcast from the last stage; a forward-only path
for predict that returns the outputs on every rank; and the optional per-stage timeline.
"""

from lightning_par.pipeline.runner import PipelineRunner, TimelineEvent
from lightning_par.pipeline.schedules import (
    IGNORE_INDEX,
    INTERLEAVED,
    PipelineConfig,
    check_schedule,
    stage_placement,
    stages_per_rank,
)
from lightning_par.pipeline.split import (
    StagePlan,
    block_parts,
    network_costs,
    plan_stages,
    plan_views,
    prune_network,
    split_layers,
    stage_view,
)
from lightning_par.pipeline.step import GradientStash, check_no_accumulation
from lightning_par.pipeline.timeline import COLOURS, LABELS, bubble_theory, draw_timeline, summarize_timeline

__all__ = [
    "COLOURS",
    "GradientStash",
    "IGNORE_INDEX",
    "INTERLEAVED",
    "LABELS",
    "PipelineConfig",
    "PipelineRunner",
    "StagePlan",
    "TimelineEvent",
    "block_parts",
    "bubble_theory",
    "check_no_accumulation",
    "check_schedule",
    "draw_timeline",
    "network_costs",
    "plan_stages",
    "plan_views",
    "prune_network",
    "split_layers",
    "stage_placement",
    "stage_view",
    "stages_per_rank",
    "summarize_timeline",
]
