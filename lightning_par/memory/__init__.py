"""Memory: activation recomputation (:mod:`.recompute`, :mod:`.selective`) and what a rank holds
(:mod:`.report`, :mod:`.saved`)."""

from lightning_par.memory.recompute import (
    MODES,
    RecomputedForward,
    RecomputeMismatch,
    apply_activation_checkpointing,
    check_recompute,
    forward_value,
    recomputing,
)
from lightning_par.memory.saved import Lease, SavedTensorCounter, active_counter, counting
from lightning_par.memory.selective import selective_policy

__all__ = [
    "MODES",
    "Lease",
    "RecomputeMismatch",
    "RecomputedForward",
    "SavedTensorCounter",
    "active_counter",
    "apply_activation_checkpointing",
    "check_recompute",
    "counting",
    "forward_value",
    "recomputing",
    "selective_policy",
]
