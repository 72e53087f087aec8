"""``PipelineTimeline``: per-stage forward, backward and idle time of one training step, drawn and logged.

The strategy's pipeline runner times every stage call of the recorded step
(:attr:`~lightning_par.pipeline.runner.PipelineRunner.record_timeline`); this callback turns that on for
one step, gathers the events of every pipeline rank, and hands them to
:mod:`lightning_par.pipeline.timeline` for the bubble figures and the Gantt chart
(``pipeline_timeline.png`` in the log directory, also logged as ``pipeline/timeline`` to loggers that take
images, with ``pipeline/bubble_measured`` and ``pipeline/bubble_theory``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch.distributed as dist

from lightning_par.pipeline.schedules import stages_per_rank
from lightning_par.pipeline.timeline import draw_timeline, summarize_timeline


class PipelineTimeline(L.Callback):
    """Record the pipeline timeline of one training step.

    Args:
        step: the optimizer step to record (``None``: the second, since the first also builds the stages;
            the first when training has only one).
    """

    def __init__(self, step: int | None = None) -> None:
        self.step = step
        self.summary: dict[str, Any] | None = None
        """The last recorded step's figures (``bubble_measured``, ``bubble_theory``, ``png``, ...)."""

    def _target(self, trainer: L.Trainer) -> int:
        if self.step is not None:
            return self.step
        return 0 if trainer.max_steps in (0, 1) else 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        runner = getattr(trainer.strategy, "pipeline", None)
        if runner is not None and trainer.global_step == self._target(trainer):
            runner.record_timeline = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        runner = getattr(trainer.strategy, "pipeline", None)
        if runner is None or not runner.record_timeline:
            return
        runner.record_timeline = False
        strategy = trainer.strategy
        layout = strategy.layout
        events: list[Any] = [None] * layout.pp
        dist.all_gather_object(events, runner.last_timeline or [], group=strategy.groups.group("pp"))
        v = stages_per_rank(strategy.pipeline_schedule, strategy.virtual_pipeline_size)
        summary = summarize_timeline(events, layout.pp, strategy.num_microbatches, v)
        summary["schedule"] = strategy.pipeline_schedule
        self.summary = summary
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
                    f"{strategy.pipeline_schedule}: bubble {summary['bubble_measured']:.3f} measured, "
                    f"{summary['bubble_theory']:.3f} theory"
                )
                log_image("pipeline/timeline", images=[path], caption=[caption], step=trainer.global_step)
