"""Pipeline schedule names, their settings' checks and where each rank's stages sit."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
"""Schedule names accepted by ``pipeline_schedule``."""

INTERLEAVED = ("interleaved_1f1b", "interleaved_zero_bubble")
IGNORE_INDEX = -100


def stages_per_rank(schedule: str, virtual_pipeline_size: int | None) -> int:
    """How many pipeline stages each pp rank runs: 1, ``virtual_pipeline_size`` (default 2) or 2 (ZBV)."""
    if schedule in INTERLEAVED:
        return virtual_pipeline_size or 2
    if schedule == "zbv":
        return 2
    return 1


def check_schedule(
    schedule: str, pipeline_parallel_size: int, num_microbatches: int, virtual_pipeline_size: int | None
) -> None:
    """Raise (naming the value and the valid choices) for settings torch's schedules cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline_schedule={schedule!r} is not known; valid choices: {sorted(SCHEDULES)}.")
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r} is not valid: it must be an integer >= 1.")
    v = virtual_pipeline_size
    if v is not None:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"virtual_pipeline_size={v!r} is not valid: it must be None or an integer >= 1.")
        if schedule == "zbv" and v != 2:
            raise ValueError(
                f"virtual_pipeline_size={v} does not fit pipeline_schedule='zbv', which always runs 2 stages "
                f"per rank (V shape); use virtual_pipeline_size=None or 2."
            )
        if schedule not in (*INTERLEAVED, "zbv") and v != 1:
            raise ValueError(
                f"virtual_pipeline_size={v} needs an interleaved schedule; valid pipeline_schedule values "
                f"with virtual stages: {list(INTERLEAVED)} (or 'zbv', which uses 2)."
            )
    p, m = pipeline_parallel_size, num_microbatches
    if schedule == "1f1b" and m < p:
        raise ValueError(
            f"num_microbatches={m} is fewer than the {p} pipeline stages: 1F1B needs num_microbatches >= "
            f"pipeline_parallel_size ({p}); use more microbatches or pipeline_schedule='gpipe'."
        )
    if schedule in INTERLEAVED:
        rounds = max(1, m // p)
        if m % rounds:
            valid = [k for k in range(p, 4 * p + 1, p)]
            raise ValueError(
                f"num_microbatches={m} does not suit pipeline_schedule={schedule!r} with "
                f"pipeline_parallel_size={p}: it must be a multiple of num_microbatches // {p} "
                f"(for example one of {valid})."
            )


def stage_placement(
    schedule: str, pipeline_parallel_size: int, virtual_pipeline_size: int | None
) -> list[list[int]]:
    """The global stage indices each pp rank runs, in the order torch's schedules expect.

    Looped placement (rank ``r`` runs ``r, r + p, ...``) for single-stage and interleaved schedules; the V
    shape of ZBV (rank ``r`` runs ``r`` and ``2p - 1 - r``), so the first and last stage share rank 0.
    """
    p = pipeline_parallel_size
    v = stages_per_rank(schedule, virtual_pipeline_size)
    if schedule == "zbv":
        return [[r, 2 * p - 1 - r] for r in range(p)]
    return [[r + i * p for i in range(v)] for r in range(p)]


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline settings of a run, as the parallelize step and the runner need them."""

    schedule: str
    num_microbatches: int
    virtual_pipeline_size: int | None = None
    stage_boundaries: list[int] | None = None

    @property
    def stages_per_rank(self) -> int:
        return stages_per_rank(self.schedule, self.virtual_pipeline_size)

    def describe(self) -> dict[str, object]:
        """For loggers and checkpoints (beside the layout's sizes)."""
        return {
            "pipeline_schedule": self.schedule,
            "num_microbatches": self.num_microbatches,
            "stages_per_rank": self.stages_per_rank,
        }
