"""``layout="auto"`` (``Trainer(strategy="auto_parallel")``): the planner picks the layout of the run.

The world size is known at ``Trainer(...)``, the model only once Lightning connects it: the plan is made
in ``setup_environment``, before any process group, on every rank alike (the cost model is deterministic),
for the real world size, processes per node, precision and device (a preset matched from the GPU's name,
or ``planner_device``: a preset name or a profile written by ``lightning-par plan --calibrate``). The
chosen layout replaces the strategy's sizes, schedule, microbatches, distributed optimizer and
recomputation; the choice and its prediction go to every logger (``auto_parallel/...`` hyper-parameters)
and to the progress output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_par.planner import PRESETS, choose_layout
from lightning_par.planner.search import Plan


def planner_device(device_type: str, given: str | Path | None) -> str | Path:
    """What the planner models: ``given``, else the preset of this GPU; on CPU a profile is needed."""
    if given is not None:
        return given
    presets = ", ".join(sorted(PRESETS))
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory
        for key, preset in (("H200", "h200"), ("H100", "h100-80gb")):
            if key in name:
                return preset
        if "A100" in name:
            return "a100-80gb" if memory > 60 * 2**30 else "a100-40gb"
        raise ValueError(
            f"layout='auto' has no preset for the GPU {name!r}: give planner_device= one of {presets} or a "
            f"profile written by `lightning-par plan --calibrate PROFILE.json`."
        )
    raise ValueError(
        f"layout='auto' on {device_type} needs planner_device=: a profile of this machine written by "
        f"`lightning-par plan --calibrate PROFILE.json` (or a GPU preset: {presets})."
    )


def make_plan(strategy: Any, global_batch_size: int | None, device: str | Path | None) -> Plan:
    """The planner's best layout for this strategy's world, module and precision."""
    precision = getattr(strategy.precision_plugin, "precision", None)
    return choose_layout(  # (raises, with the smallest memory it would need, when nothing fits)
        strategy.lightning_module,
        strategy.num_processes * strategy.num_nodes,
        strategy.num_processes,
        planner_device(strategy.root_device.type, device),
        global_batch_size,
        precision=precision if precision in ("32-true", "bf16-mixed", "bf16-true") else None,
    )


def apply_plan(strategy: Any, plan: Plan) -> None:
    """Put the plan's layout into the strategy (before its layout is resolved)."""
    kw = plan.strategy_kwargs()
    strategy._sizes = (
        kw["tensor_parallel_size"],
        kw["data_parallel_size"],
        kw["pipeline_parallel_size"],
        kw["expert_parallel_size"],
    )
    strategy.sequence_parallel = kw["sequence_parallel"]
    strategy.pipeline_schedule = kw["pipeline_schedule"]
    strategy.virtual_pipeline_size = kw["virtual_pipeline_size"]
    strategy._microbatches_arg = kw["num_microbatches"]
    strategy.distributed_optimizer = kw["distributed_optimizer"]
    strategy.recompute = (kw["activation_checkpointing"], None)


def report_plan(trainer: Any, plan: Plan) -> None:
    """The choice and its prediction to every logger and to the progress output."""
    prediction = {k: v for k, v in plan.prediction.items() if isinstance(v, int | float | bool)}
    params = {f"auto_parallel/{k}": v for k, v in {**plan.strategy_kwargs(), **prediction}.items()}
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
    rank_zero_info(
        f"auto_parallel: {plan.describe()} (predicted {plan.prediction.get('step_s', float('nan')):.3f} s/step, "
        f"{plan.prediction.get('tokens_per_s', float('nan')):.0f} tokens/s)"
    )
