"""The Lightning side: :class:`HybridParallelStrategy` (Lightning's hooks over the engine) and its presets."""

from lightning_par.strategies.hybrid import (
    ExpertParallelStrategy,
    HybridParallelStrategy,
    PipelineParallelStrategy,
    TensorParallelStrategy,
)
from lightning_par.strategies.lightning_patches import AccumulationOverride, DeferredSigtermCheck

__all__ = [
    "AccumulationOverride",
    "DeferredSigtermCheck",
    "ExpertParallelStrategy",
    "HybridParallelStrategy",
    "PipelineParallelStrategy",
    "TensorParallelStrategy",
]
