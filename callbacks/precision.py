"""Mixed precision for every layout: bf16, and fp16 with a loss scale that every rank agrees on.

``MixedPrecision(precision="16-mixed")`` in the trainer's callbacks (one line of YAML) installs
:class:`ShardedMixedPrecision` as the strategy's precision plugin before the model is set up. Weights and
optimizer state stay fp32 (master weights); forward and backward run under ``torch.autocast``.

Why a plugin of our own: Lightning turns ``precision="16-mixed"`` into bf16 on CPU and its
``ModelParallelStrategy`` refuses fp16 (it would need a sharded grad scaler). The overflow check must be
agreed by all ranks: one tp shard, one pipeline stage or one data-parallel replica that sees inf/NaN makes
every rank skip the step and halve the scale, or the replicas would drift apart. Here each rank unscales
and checks its own gradients (torch's fused ``_amp_foreach_non_finite_check_and_unscale_``, as
``GradScaler`` does) and one all-reduce(MAX) over the whole world decides.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.distributed.tensor import DTensor

PRECISIONS = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class ShardedMixedPrecision(Precision):
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


class MixedPrecision(L.Callback):
    """Install :class:`ShardedMixedPrecision` on the strategy and log the loss scale and skipped steps.

    YAML: ``- class_path: lightning_par.callbacks.MixedPrecision`` with ``init_args: {precision: 16-mixed}``.
    Logged: ``precision/loss_scale`` and ``precision/skipped_steps`` (fp16), the same on every rank.
    """

    def __init__(
        self,
        precision: str = "bf16-mixed",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        ShardedMixedPrecision(precision, "cpu", init_scale, growth_factor, backoff_factor, growth_interval)
        self.kwargs = dict(
            precision=precision,
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
        )
        self.plugin: ShardedMixedPrecision | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.precision not in ("32-true", "32"):
            raise ValueError(
                f"Trainer(precision={trainer.precision!r}) and the MixedPrecision callback both set the precision; "
                f"keep the Trainer at its default ('32-true') and choose the precision in the callback."
            )
        self.plugin = ShardedMixedPrecision(device_type=trainer.strategy.root_device.type, **self.kwargs)
        trainer.strategy.precision_plugin = self.plugin

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.plugin is None or not self.plugin.scaling:
            return
        pl_module.log("precision/loss_scale", float(self.plugin.loss_scale), on_step=True, on_epoch=False)
        pl_module.log(
            "precision/skipped_steps", float(self.plugin.skipped_steps), on_step=True, on_epoch=False
        )
