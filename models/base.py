"""What every model LightningModule of this package shares, written once (GPT and the BERT tasks).

The strategy's pipeline runner, when the network is split into stages; the logged training loss (a
token-weighted mean over every data-parallel replica, not a mean of means); the model and layout handed to
the loggers at the start of fit; and AdamW with linear warmup and cosine decay (or, when the run has no
finite step count and no ``lr_decay_steps``, warmup then a constant rate), weight decay on matrices only.
Subclasses set ``config`` (a dataclass) and the hyper-parameters ``learning_rate``, ``min_lr_ratio``,
``weight_decay``, ``betas``, ``warmup_steps`` and ``lr_decay_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class ParallelModule(L.LightningModule):
    """Base of the package's LightningModules (see the module docstring)."""

    no_weight_decay: tuple[str, ...] = ("wpe",)
    """Name parts of matrices that take no weight decay (embeddings of positions and token types)."""

    def _pipeline(self) -> Any:
        """The strategy's pipeline runner, when the model is split into pipeline stages."""
        if self._trainer is None:
            return None
        return getattr(self._trainer.strategy, "pipeline", None)

    def _training_output(self, loss_sum: Tensor, num_tokens: Tensor) -> dict[str, Tensor]:
        """Log ``train/loss`` (token-weighted over every replica) and return the step's mean loss and count."""
        loss = loss_sum / num_tokens.clamp(min=1)
        stats = torch.stack([loss_sum.detach().float(), num_tokens.detach().float()])
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        self.log("train/loss", stats[0] / stats[1].clamp(min=1), prog_bar=True)
        return {"loss": loss, "num_tokens": num_tokens.detach()}

    def on_fit_start(self) -> None:
        if self.logger is None:
            return
        describe = getattr(self.trainer.strategy, "describe_layout", None)
        parallel = describe() if describe else {"world_size": self.trainer.world_size}
        self.logger.log_hyperparams({"model_config": asdict(self.config), "parallel": parallel})

    def _param_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                exempt = p.ndim < 2 or any(part in name for part in self.no_weight_decay)
                (no_decay if exempt else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warmup, then cosine decay over ``lr_decay_steps`` (default: the run's steps).

        A run bounded only by time (``Trainer(max_time=..., max_steps=-1, max_epochs=-1)``) has no step
        count to decay over: without ``lr_decay_steps`` the rate stays at ``learning_rate`` after warmup
        (with a warning), since a cosine needs to know where it ends.
        """
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self._param_groups(), lr=hp.learning_rate, betas=tuple(hp.betas), foreach=True
        )
        total = hp.lr_decay_steps
        if not total:
            estimated = self.trainer.estimated_stepping_batches
            if math.isfinite(estimated):
                total = max(1, int(estimated))
        if total:
            schedule = warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio)
        else:
            rank_zero_warn(
                "The trainer has no finite number of steps (max_steps=-1 and max_epochs=-1, e.g. a run bounded "
                f"by max_time) and lr_decay_steps={hp.lr_decay_steps}: the learning rate warms up over "
                f"warmup_steps={hp.warmup_steps} and then stays at learning_rate={hp.learning_rate}. Set "
                "lr_decay_steps for a cosine decay."
            )
            schedule = warmup_constant(hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1 (the same ramp as :func:`warmup_cosine`), then 1: for runs without a step count."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 1.0

    return fn
