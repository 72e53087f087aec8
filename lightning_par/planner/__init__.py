"""The auto-parallel planner: the fastest layout that fits, from a cost model of this implementation.

``choose_layout(model, world_size, devices_per_node, device, global_batch_size, seq_len)`` returns a
:class:`Plan` (``HybridParallelStrategy`` arguments and the prediction); ``lightning-par plan`` prints the
ranked list. The cost model (:mod:`.cost`) counts the bytes and seconds of the code as it runs; devices
are presets or profiles measured with :func:`calibrate`.
"""

from lightning_par.planner.calibrate import calibrate
from lightning_par.planner.cost import Layout, predict_memory
from lightning_par.planner.devices import PRESETS, DeviceSpec, Link, get_device, merge_profiles
from lightning_par.planner.model import ModelSpec
from lightning_par.planner.search import NoLayoutFits, Plan, choose_layout, evaluate, explain, plan_layouts
from lightning_par.planner.steptime import predict_time

__all__ = [
    "PRESETS",
    "DeviceSpec",
    "Layout",
    "Link",
    "ModelSpec",
    "NoLayoutFits",
    "Plan",
    "calibrate",
    "merge_profiles",
    "choose_layout",
    "evaluate",
    "explain",
    "get_device",
    "plan_layouts",
    "predict_memory",
    "predict_time",
]
