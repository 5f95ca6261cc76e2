"""Training objectives.

`l_simple` is DDPM's simplified objective (Ho et al. 2020, eq. 14 and Algorithm 1):

    L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t) ||^2

with t uniform over the T steps. The per-example mean over pixels is returned so that callers can weight
or mask examples before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from src.diffusion.schedule import NoiseSchedule

Denoiser = Callable[..., Tensor]


def sample_timesteps(
    batch_size: int, num_timesteps: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """t ~ Uniform({0, ..., T-1}), int64 (Algorithm 1, line 3)."""
    return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)


def l_simple(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    **model_kwargs: object,
) -> Tensor:
    """Per-example L_simple: mean over pixels of (eps - eps_theta(x_t, t))^2, shape (B,).

    `t` and `noise` are drawn when not given (Algorithm 1, lines 3-4). Extra keyword arguments (e.g. class
    labels `y`) are passed to the model.
    """
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, noise)
    eps_pred = model(x_t, t, **model_kwargs)
    # Compute the squared error in float32 even under bf16 autocast: the loss is a small difference of
    # O(1) numbers.
    return (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
