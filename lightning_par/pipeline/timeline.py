"""The pipeline timeline: per-stage forward, backward and idle time of one step, and its Gantt chart.

The strategy (``pipeline_timeline=True``) times every forward and backward call of its stages in one
training step (:class:`lightning_par.pipeline.PipelineRunner`), gathers the events of all pipeline ranks
and hands them here. The measured bubble is the mean idle fraction of the ranks over the step's span
(first start to last end of any rank); the theory for ``p`` ranks, ``m`` microbatches and ``v`` stages
per rank is ``(p - 1) / (v m + p - 1)`` (``v = 1``: GPipe and 1F1B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}
LABELS = {"F": "forward", "B": "backward (input)", "W": "backward (weights)"}


def bubble_theory(pipeline_parallel_size: int, num_microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a plain (v = 1) or interleaved (v stages per rank) 1F1B/GPipe pipeline."""
    p, m, v = pipeline_parallel_size, num_microbatches, stages_per_rank
    return (p - 1) / (v * m + p - 1)


def summarize_timeline(
    events_per_rank: list[list[Any]], pipeline_parallel_size: int, num_microbatches: int, stages_per_rank: int
) -> dict[str, Any]:
    """Per-rank busy/idle seconds, the measured bubble and the theoretical ones."""
    starts = [e.start for events in events_per_rank for e in events]
    ends = [e.end for events in events_per_rank for e in events]
    if not starts:
        raise ValueError("no pipeline events were recorded: was the timeline step a training step?")
    t0, span = min(starts), max(ends) - min(starts)
    ranks = []
    for rank, events in enumerate(events_per_rank):
        by_kind = {k: sum(e.end - e.start for e in events if e.kind == k) for k in COLOURS}
        busy = sum(by_kind.values())
        ranks.append(
            {
                "rank": rank,
                "forward_s": by_kind["F"],
                "backward_s": by_kind["B"] + by_kind["W"],
                "idle_s": span - busy,
                "idle_fraction": (span - busy) / span if span > 0 else 0.0,
            }
        )
    p, m, v = pipeline_parallel_size, num_microbatches, stages_per_rank
    return {
        "start": t0,
        "span_s": span,
        "ranks": ranks,
        "bubble_measured": sum(r["idle_fraction"] for r in ranks) / len(ranks),
        "bubble_theory": bubble_theory(p, m, v),
        "bubble_theory_plain": bubble_theory(p, m, 1),
        "pipeline_parallel_size": p,
        "num_microbatches": m,
        "stages_per_rank": v,
    }


def draw_timeline(events_per_rank: list[list[Any]], summary: dict[str, Any], path: str | Path) -> str:
    """Draw one row per pipeline rank (bars: forward, input backward, weight backward) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = summary["start"]
    p = len(events_per_rank)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * p))
    for rank, events in enumerate(events_per_rank):
        for e in events:
            ax.broken_barh(
                [((e.start - t0) * 1e3, (e.end - e.start) * 1e3)],
                (rank - 0.4, 0.8),
                facecolors=COLOURS[e.kind],
                edgecolor="white",
                linewidth=0.5,
            )
            width_ms = (e.end - e.start) * 1e3
            if width_ms > summary["span_s"] * 1e3 / 60:
                ax.text(
                    (e.start - t0) * 1e3 + width_ms / 2,
                    rank,
                    f"{e.microbatch}" + (f"/s{e.stage}" if summary["stages_per_rank"] > 1 else ""),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(p), [f"pp rank {r}" for r in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(
        f"{summary.get('schedule', 'pipeline')}: p={summary['pipeline_parallel_size']}, "
        f"m={summary['num_microbatches']}, v={summary['stages_per_rank']} | bubble measured "
        f"{summary['bubble_measured']:.3f}, theory {summary['bubble_theory']:.3f}"
        + (f" (plain {summary['bubble_theory_plain']:.3f})" if summary["stages_per_rank"] > 1 else "")
    )
    fig.legend(
        handles=[Patch(color=c, label=LABELS[k]) for k, c in COLOURS.items()],
        loc="lower center",
        ncol=3,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
