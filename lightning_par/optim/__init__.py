"""What happens to gradients between backward and the optimizer step: reduction over the right groups,
the exact global norm for clipping.
"""

from lightning_par.optim.gradients import (
    GradientSync,
    StepTokens,
    bucket_all_reduce,
    is_replicated_dtensor,
    local,
    optimizer_params,
    sum_squares,
)

__all__ = [
    "GradientSync",
    "StepTokens",
    "bucket_all_reduce",
    "is_replicated_dtensor",
    "local",
    "optimizer_params",
    "sum_squares",
]
