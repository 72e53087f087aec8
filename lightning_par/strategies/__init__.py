"""The Lightning side: :class:`HybridParallelStrategy` (Lightning's hooks over the engine) and its presets."""

from lightning_par.strategies.hybrid import HybridParallelStrategy
from lightning_par.strategies.lightning_patches import AccumulationOverride, DeferredSigtermCheck
from lightning_par.strategies.precision import (
    PRECISIONS,
    ExactClipping,
    ParallelAutocastPrecision,
    ParallelHalfPrecision,
    ParallelPrecision,
    ShardedMixedPrecision,
    require_exact_clipping,
    with_exact_clipping,
)
from lightning_par.strategies.presets import (
    ExpertParallelStrategy,
    PipelineParallelStrategy,
    TensorParallelStrategy,
)

__all__ = [
    "AccumulationOverride",
    "DeferredSigtermCheck",
    "ExactClipping",
    "ExpertParallelStrategy",
    "HybridParallelStrategy",
    "PRECISIONS",
    "ParallelAutocastPrecision",
    "ParallelHalfPrecision",
    "ParallelPrecision",
    "PipelineParallelStrategy",
    "ShardedMixedPrecision",
    "TensorParallelStrategy",
    "require_exact_clipping",
    "with_exact_clipping",
]
