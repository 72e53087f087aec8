"""Metrics that are exact under every layout: token-weighted sums reduced over data-parallel ranks only."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
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


class TokenAccuracy(Metric):
    """Fraction of counted tokens (label != -100) predicted correctly, over an epoch.

    Like :class:`TokenMeanLoss`, reduced over the data-parallel group only (the strategy sets it).
    """

    full_state_update = False

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, labels: Tensor) -> None:
        counted = labels != self.ignore_index
        self.correct += ((predicted == labels) & counted).sum()
        self.total += counted.sum()

    def compute(self) -> Tensor:
        return self.correct.double().div(self.total.clamp(min=1)).to(torch.float32)


@torch.no_grad()
def vocab_parallel_argmax(logits: Tensor, info: Any, vocab_size: int) -> Tensor:
    """``argmax`` over the last dimension of logits split over the vocabulary (``info``: its ``TPInfo``).

    Each rank takes its slice's maximum over real (unpadded) rows; one all-gather of (value, index) per
    token picks the global one. Ties go to the lowest index, as ``torch.argmax`` does in one process.
    """
    if info is None:
        return logits[..., :vocab_size].argmax(-1)
    real_local = info.num_real_rows - info.vocab_start
    if real_local < logits.shape[-1]:
        pad = torch.arange(logits.shape[-1], device=logits.device) >= real_local
        logits = logits.masked_fill(pad, float("-inf"))
    value, index = logits.float().max(-1)
    values = [torch.empty_like(value) for _ in range(info.size)]
    indices = [torch.empty_like(index) for _ in range(info.size)]
    dist.all_gather(values, value.contiguous(), group=info.group)
    dist.all_gather(indices, (index + info.vocab_start).contiguous(), group=info.group)
    best = torch.stack(values).argmax(0, keepdim=True)  # first rank holding the maximum
    return torch.stack(indices).gather(0, best).squeeze(0)
