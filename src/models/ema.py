"""Exponential moving average of a network's weights (Polyak averaging), as used by DDPM for sampling.

    theta_ema <- decay * theta_ema + (1 - decay) * theta

The DDPM paper uses decay 0.9999 from the first step. With `warmup=True` the decay follows TensorFlow's
`ExponentialMovingAverage(num_updates=...)` rule, min(decay, (1 + n) / (10 + n)) after n updates, so that
short runs (a few thousand steps) are not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(num_updates: int, decay: float = 0.9999, warmup: bool = True) -> float:
    """The decay of update number `num_updates` (0-based): `decay`, or with `warmup` min(decay, (1 + n) / (10 + n))."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


@torch.no_grad()
def update_ema(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta for every parameter of `averaged` (one fused foreach
    lerp); floating-point buffers are averaged too, others copied. Both modules must have the same structure."""
    ema_params = list(averaged.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError("EMA and model have different parameter lists")
    weight = 1.0 - decay
    torch._foreach_lerp_(ema_params, params, weight)
    for ema_buffer, buffer in zip(averaged.buffers(), model.buffers(), strict=True):
        if ema_buffer.is_floating_point():
            ema_buffer.lerp_(buffer, weight)
        else:
            ema_buffer.copy_(buffer)


class EMA(nn.Module):
    """Holds a frozen copy of `model` whose weights track `model`'s by exponential moving average.

    It is an `nn.Module`, so its weights are part of the owner's `state_dict` (checkpoints and resume); its
    parameters have `requires_grad=False` and are left out of the optimizer by the owner.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        """The decay used for update number `num_updates` (0-based)."""
        return ema_decay(num_updates, self.decay, self.warmup)

    def update(self, model: nn.Module, num_updates: int) -> None:
        """One EMA step towards `model`'s current weights."""
        update_ema(self.model, model, self.decay_at(num_updates))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> EMA:
        # The averaged copy is always in eval mode (no dropout), whatever the owner's mode.
        super().train(mode)
        self.model.eval()
        return self
