"""A mean with its standard error, accumulated over batches and processes (torchmetrics state, summed under DDP)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanStandardError(Metric):
    """The mean of per-example values and its standard error s / sqrt(n), s the sample standard deviation (n - 1):
    what a Monte-Carlo estimate such as a bound in bits/dim is reported with. `compute()` -> (mean, standard error);
    the error is nan for fewer than two values."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_squares", "count"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.total += values.sum()
        self.total_squares += values.square().sum()
        self.count += values.numel()

    def compute(self) -> tuple[Tensor, Tensor]:
        mean = self.total / self.count
        # sum (x - mean)^2 = sum x^2 - n mean^2; clamped at 0 against rounding for equal values.
        variance = ((self.total_squares - self.count * mean.square()) / (self.count - 1)).clamp(min=0)
        return mean, (variance / self.count).sqrt()
