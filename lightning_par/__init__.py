"""lightning-par: Megatron-class parallelism as PyTorch Lightning strategies.

Importing the package registers the strategy names with Lightning, so ``Trainer(strategy="tp")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_par.distributed.layout import ParallelLayout
from lightning_par.protocols import ProtocolError
from lightning_par.strategies.hybrid import HybridParallelStrategy
from lightning_par.strategies.presets import (
    ExpertParallelStrategy,
    PipelineParallelStrategy,
    TensorParallelStrategy,
)

__all__ = [
    "ExpertParallelStrategy",
    "HybridParallelStrategy",
    "ParallelLayout",
    "PipelineParallelStrategy",
    "ProtocolError",
    "TensorParallelStrategy",
]
__version__ = "0.1.0"

_STRATEGIES = {
    "tp": (TensorParallelStrategy, "Tensor parallel over all devices (tp = devices), Megatron style."),
    "tp_sp": (
        TensorParallelStrategy,
        "Tensor parallel with sequence parallel over all devices.",
        {"sequence_parallel": True},
    ),
    "pp": (PipelineParallelStrategy, "Pipeline parallel over all devices (pp = devices), 1F1B."),
    "tp_pp": (
        HybridParallelStrategy,
        "Tensor x pipeline parallel: tp fills a node (up to 8, at most half the devices), pp takes the rest.",
        {"tensor_parallel_size": None, "pipeline_parallel_size": None},
    ),
    "auto_parallel": (
        HybridParallelStrategy,
        "The layout the planner predicts fastest for the model, the world and the device (layout='auto').",
        {"layout": "auto"},
    ),
    "ep": (
        ExpertParallelStrategy,
        "Expert parallel over all devices (ep = dp = devices): experts split, dense weights data-parallel.",
    ),
    "tp_pp_ep": (
        HybridParallelStrategy,
        "Two data-parallel replicas that split the experts (ep = dp = 2); each replica is tp x pp by the "
        "tp_pp rule (4 devices: pp=2; 8 devices: tp=2, pp=2).",
        {
            "tensor_parallel_size": None,
            "pipeline_parallel_size": None,
            "data_parallel_size": 2,
            "expert_parallel_size": None,
        },
    ),
}

for _name, (_cls, _description, *_kw) in _STRATEGIES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, _cls, description=_description, **(_kw[0] if _kw else {}))
