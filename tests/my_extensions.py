"""A sampler, a loss weighting and a network defined outside `src/`, as a researcher adds their own
(docs/extending.md); tests/test_extending.py selects them by config alone, with tests/ on the Python path:

    --model.sampling.sampler my_extensions.ddim_eta0
    --model.training.loss_weighting my_extensions.double_weight
    --model.net.class_path my_extensions.TinyConvNet
    --model.process my_extensions.LearnedLinearLogSNR          (a learned schedule; tests/test_core_parts.py)
    --model.first_stage my_extensions.PixelUnshuffleStage      (a fixed invertible first stage; ibid.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.diffusion.parameterization import X0Clip, threshold_x0
from src.diffusion.process import DiffusionProcess
from src.diffusion.samplers import predict_x0_from_eps
from src.diffusion.schedule import NoiseSchedule
from src.models.first_stage import FirstStage


@torch.no_grad()
def ddim_eta0(
    model, x_T: Tensor, schedule: NoiseSchedule, timesteps: list[int], clip_x0: X0Clip = False, **options
) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0), written from the paper: from the last of
    `timesteps` to the first, x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat, with a_{-1} = 1."""
    a = schedule.alphas_cumprod
    x = x_T
    for i in reversed(range(len(timesteps))):
        t = timesteps[i]
        a_t = float(a[t])
        a_prev = float(a[timesteps[i - 1]]) if i > 0 else 1.0
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)).to(x.dtype)
        x0 = predict_x0_from_eps(x, eps, a_t)
        if clip_x0:  # bound x_0 (clamp, or dynamic thresholding) and re-derive eps, as the built-in samplers do
            x0 = threshold_x0(x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
    return x


@torch.no_grad()
def denoise_once(model, x_T: Tensor, schedule: NoiseSchedule, **options) -> Tensor:
    """One network call: the x_0 that eps_theta(x_T, T - 1) implies (DDPM eq. 4 solved for x_0)."""
    t = schedule.num_timesteps - 1
    eps = model(x_T, torch.full((x_T.shape[0],), t, dtype=torch.int64, device=x_T.device))
    return predict_x0_from_eps(x_T, eps.to(x_T.dtype), float(schedule.alphas_cumprod[t])).clamp(-1.0, 1.0)


def double_weight(snr: Tensor, prediction: str) -> Tensor:
    """A loss weighting `weight(snr, prediction) -> Tensor`: 2 for every example (exactly twice L_simple)."""
    return torch.full_like(snr, 2.0)


class TinyConvNet(nn.Module):
    """A plain eps_theta(x_t, t): three 3x3 convolutions, t / T as an extra input channel.

    `in_channels` and `image_size` are what the command line links to the data (`--data.image_size`) and checks the
    images against; `config` (the constructor arguments) is recorded in checkpoints so that `--ckpt_path` rebuilds
    the net."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, width: int = 16, timesteps: int = 1000) -> None:
        super().__init__()
        self.in_channels, self.image_size, self.timesteps = in_channels, image_size, timesteps
        self.config = dict(in_channels=in_channels, image_size=image_size, width=width, timesteps=timesteps)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        level = (t.to(x.dtype) / self.timesteps).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.body(torch.cat([x, level], dim=1))


class LearnedLinearLogSNR(DiffusionProcess):
    """A learned schedule: log SNR linear in t from `log_snr_start` (t = 0) to `log_snr_end` (t = T - 1), both
    endpoints trained (VDM's linear gamma(t) = -log SNR(t) with learned gamma_min, gamma_max; Kingma et al. 2021,
    section 5). The defaults are close to DDPM's linear schedule's endpoints (log SNR 9.2 and -10.1)."""

    def __init__(self, timesteps: int = 1000, log_snr_start: float = 9.0, log_snr_end: float = -10.0) -> None:
        super().__init__(timesteps)
        self.config = dict(timesteps=timesteps, log_snr_start=log_snr_start, log_snr_end=log_snr_end)
        self.endpoints = nn.Parameter(torch.tensor([log_snr_start, log_snr_end]))

    def log_snr(self, t: Tensor) -> Tensor:
        fraction = t.to(self.endpoints.dtype) / (self.num_timesteps - 1)
        return self.endpoints[0] + (self.endpoints[1] - self.endpoints[0]) * fraction


class PixelUnshuffleStage(FirstStage):
    """A fixed invertible first stage: each `factor` x `factor` block of pixels becomes `factor`^2 channels
    (C x H x W -> C f^2 x H/f x W/f; torch's pixel_unshuffle), decoded exactly by pixel_shuffle."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.config = dict(factor=factor)

    def encode(self, images: Tensor) -> Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.factor)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        c, h, w = image_shape
        return (c * self.factor**2, h // self.factor, w // self.factor)

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        c, h, w = latent_shape
        return (c // self.factor**2, h * self.factor, w * self.factor)


def l_simple_again(model, x0: Tensor, schedule, t: Tensor, noise: Tensor | None, prediction: str, **model_kwargs):
    """An objective of one's own (`--model.training.objective my_extensions.l_simple_again`): L_simple written out from the
    process's alpha(t), sigma(t) (DDPM eq. 14 in the prediction target's form), plus a logged term."""
    noise = torch.randn_like(x0) if noise is None else noise
    alpha, sigma = schedule.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * noise
    target = {"eps": noise, "x0": x0, "v": alpha * noise - sigma * x0}[prediction]
    error = (model(x_t, t, **model_kwargs).float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return {"loss": error, "t_mean": t.float()}
