"""Metrics that are exact under every layout: token-weighted sums reduced over data-parallel ranks only."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenMeanLoss(Metric):
    """Mean loss per counted token over an epoch: ``sum(loss_sum) / sum(num_tokens)``.

    The strategy points ``process_group`` at the data-parallel group: tensor and pipeline peers hold
    the same numbers and must not be counted twice.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, num_tokens: Tensor) -> None:
        self.loss_sum += loss_sum.detach().to(torch.float64)
        self.num_tokens += num_tokens.detach().to(torch.long)

    def compute(self) -> Tensor:
        return (self.loss_sum / self.num_tokens.clamp(min=1)).to(torch.float32)
