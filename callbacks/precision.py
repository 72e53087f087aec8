"""``MixedPrecision``: bf16 or fp16 (with a loss scale every rank agrees on) on every layout, from one line of YAML.

The callback installs :class:`~lightning_par.strategies.precision.ShardedMixedPrecision` as the strategy's
precision plugin before the model is set up (see that module for why a plugin of our own), and logs the
loss scale and the skipped steps.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_par.strategies.precision import ShardedMixedPrecision


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
