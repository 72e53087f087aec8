"""Lightning precision plugins that clip by the exact global norm, and fp16 with a world-wide loss scale.

**Clipping.** Lightning clips through its precision plugin (``clip_gradients`` -> ``clip_grad_by_norm``),
which calls torch's ``clip_grad_norm_``: it cannot count a parameter replicated over tp once, add the
norms of pipeline stages, or mix DTensor and plain gradients. :class:`ExactClipping` overrides
``clip_grad_by_norm`` with the strategy's exact norm (:class:`~lightning_par.optim.gradients.GradientSync`);
the strategy turns whichever plugin Lightning picked (``32-true``, ``bf16-mixed``, ``16-true``,
``bf16-true``) into the matching subclass when it is handed the plugin (:func:`with_exact_clipping`).

**fp16.** :class:`ShardedMixedPrecision` (installed by ``lightning_par.callbacks.MixedPrecision``) exists
because Lightning turns ``precision="16-mixed"`` into bf16 on CPU and its ``ModelParallelStrategy``
refuses fp16 (it would need a sharded grad scaler). The overflow check must be agreed by all ranks: one
tp shard, one pipeline stage or one data-parallel replica that sees inf/NaN makes every rank skip the step
and halve the scale, or the replicas would drift apart. Here each rank unscales and checks its own
gradients (torch's fused ``_amp_foreach_non_finite_check_and_unscale_``, as ``GradScaler`` does) and one
all-reduce(MAX) over the whole world decides.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_par.optim.gradients import local, optimizer_params


class ExactClipping:
    """Mixin for a precision plugin: ``clip_grad_by_norm`` by the whole model's exact gradient norm.

    ``grad_norm`` (set by the strategy) returns that norm for a list of parameters; ``last_grad_norm``
    keeps the latest one for logging.
    """

    grad_norm: Callable[[list[Tensor]], Tensor] | None = None
    last_grad_norm: Tensor | None = None

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float | int) -> None:
        if self.grad_norm is None:
            raise RuntimeError(
                f"{type(self).__name__} clips by the exact norm of a parallel layout; it is used by "
                f"lightning_par's strategies only."
            )
        params = list(optimizer_params(optimizer))
        total = self.grad_norm(params)
        self.last_grad_norm = total
        coef = (float(clip_val) / (total + 1e-6)).clamp(max=1.0)
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))


class ParallelPrecision(ExactClipping, Precision):
    """fp32 (``precision="32-true"``)."""


class ParallelAutocastPrecision(ExactClipping, MixedPrecision):
    """Lightning's autocast plugin (``"bf16-mixed"``)."""


class ParallelHalfPrecision(ExactClipping, HalfPrecision):
    """Lightning's half-precision weights (``"16-true"``, ``"bf16-true"``)."""


_EXACT: dict[type, type] = {
    Precision: ParallelPrecision,
    MixedPrecision: ParallelAutocastPrecision,
    HalfPrecision: ParallelHalfPrecision,
}


def with_exact_clipping(plugin: Precision) -> Precision:
    """``plugin`` as the subclass of its class that clips by the exact norm (the same state, a new object).

    Plugins of other classes are returned as they are; the strategy refuses gradient clipping with them.
    """
    if isinstance(plugin, ExactClipping):
        return plugin
    cls = _EXACT.get(type(plugin))
    if cls is None:
        return plugin
    exact = cls.__new__(cls)
    exact.__dict__.update(vars(plugin))
    return exact


def require_exact_clipping(plugin: Precision, gradient_clip_val: float | int | None) -> None:
    """Refuse clipping with a plugin whose clipping cannot count a parallel layout's gradients."""
    if gradient_clip_val and not isinstance(plugin, ExactClipping):
        raise ValueError(
            f"gradient_clip_val={gradient_clip_val} needs a precision plugin that clips by the exact norm of "
            f"the parallel layout; {type(plugin).__name__} does not. Use precision='32-true', 'bf16-mixed', "
            f"'16-true' or 'bf16-true', or lightning_par.callbacks.MixedPrecision."
        )


PRECISIONS = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class ShardedMixedPrecision(ExactClipping, Precision):
    """Autocast to fp16 or bf16; for fp16, dynamic loss scaling with a world-wide overflow decision.

    Args:
        precision: ``"16-mixed"`` (fp16, loss scaling) or ``"bf16-mixed"`` (no scaling needed).
        device_type: the autocast device (``"cpu"`` or ``"cuda"``).
        init_scale: the first loss scale.
        growth_factor / backoff_factor: the scale is multiplied by these after ``growth_interval`` clean
            steps in a row / after a step with an overflow.
    """

    def __init__(
        self,
        precision: str = "16-mixed",
        device_type: str = "cpu",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision={precision!r} is not supported here; valid choices: {sorted(PRECISIONS)}."
            )
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                f"loss scaling needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval}."
            )
        self.precision = precision  # type: ignore[assignment]
        self.dtype = PRECISIONS[precision]
        self.device_type = device_type
        self.scaling = precision == "16-mixed"
        self.loss_scale: float | None = float(init_scale) if self.scaling else None
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._clean_steps = 0

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)

    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        if self.scaling:
            tensor = tensor * self.loss_scale
        return super().pre_backward(tensor, module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        closure_result = closure()  # forward, (scaled) backward, the strategy's gradient reductions
        if not self.scaling:
            self._after_closure(model, optimizer)
            return optimizer.step(**kwargs)
        grads = [
            (g.to_local() if isinstance(g, DTensor) else g)
            for group in optimizer.param_groups
            for p in group["params"]
            if (g := p.grad) is not None
        ]
        device = grads[0].device if grads else torch.device(self.device_type)
        found_inf = torch.zeros(1, device=device)
        inv_scale = torch.full((1,), 1.0 / self.loss_scale, device=device)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # every tp shard, stage and replica
        self.last_step_skipped = bool(found_inf.item())
        if self.last_step_skipped:
            self.skipped_steps += 1
            self.loss_scale *= self.backoff_factor
            self._clean_steps = 0
            return closure_result
        self._after_closure(model, optimizer)  # on_before_optimizer_step hooks, clipping of true gradients
        optimizer.step(**kwargs)
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self.loss_scale *= self.growth_factor
            self._clean_steps = 0
        return closure_result

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_scale": self.loss_scale,
            "skipped_steps": self.skipped_steps,
            "clean_steps": self._clean_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_scale = state_dict.get("loss_scale", self.loss_scale)
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self._clean_steps = state_dict.get("clean_steps", 0)
