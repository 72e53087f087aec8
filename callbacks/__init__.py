"""Callbacks for parallel training (installed as ``lightning_par.callbacks``)."""

from lightning_par.callbacks.accumulation import BatchSizeRampup, GlobalBatchSize
from lightning_par.callbacks.checkpoint import ShardedCheckpoint
from lightning_par.callbacks.memory import MemoryReport
from lightning_par.callbacks.precision import MixedPrecision
from lightning_par.callbacks.sampling import GenerateText
from lightning_par.callbacks.throughput import ParallelThroughputMonitor, TokensPerSecond
from lightning_par.callbacks.timeline import PipelineTimeline

from lightning_par.strategies.precision import ShardedMixedPrecision

__all__ = [
    "BatchSizeRampup",
    "GenerateText",
    "GlobalBatchSize",
    "MemoryReport",
    "MixedPrecision",
    "ParallelThroughputMonitor",
    "ShardedCheckpoint",
    "PipelineTimeline",
    "ShardedMixedPrecision",
    "TokensPerSecond",
]
