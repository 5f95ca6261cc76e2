"""Noise schedules of the forward process q(x_t | x_0).

Notation follows Ho et al., "Denoising Diffusion Probabilistic Models" (DDPM, 2020), with 0-based timesteps:
`t = 0` is the paper's t = 1 (least noisy) and `t = T - 1` the paper's t = T.

    alphas          = 1 - betas
    alphas_cumprod  = prod_{s <= t} alphas_s                       (alpha-bar_t)
    x_t             = sqrt(alphas_cumprod[t]) x_0 + sqrt(1 - alphas_cumprod[t]) eps      (DDPM eq. 4)

All constants are computed once in float64 and cast to the working dtype at the point of use: the
products in alphas_cumprod lose several digits in float32 near t = T.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor


def extract(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """`values[t]` reshaped to broadcast against `x` (B, ...), in `x`'s dtype and device."""
    if values.device != x.device:  # prefer `schedule.to(device)` once over a copy per call
        values = values.to(x.device)
    return values[t.to(values.device)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def alpha_sigma_from_log_snr(log_snr: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    """alpha = sqrt(sigmoid(lambda)) and sigma = sqrt(sigmoid(-lambda)) of a (B,) batch of log SNRs lambda, in their
    dtype, shaped (B, 1, ...) to broadcast against a tensor of `ndim` dimensions. The sigmoids keep
    alpha^2 + sigma^2 = 1 without cancellation at either end (Kingma et al. 2021, eq. 3 with gamma = -lambda)."""
    shape = (-1,) + (1,) * (ndim - 1)
    return torch.sigmoid(log_snr).sqrt().reshape(shape), torch.sigmoid(-log_snr).sqrt().reshape(shape)


class NoiseSchedule:
    """A discrete variance schedule beta_1..beta_T and every constant derived from it.

    Construct it from any 1-D sequence of betas in (0, 1), or with `NoiseSchedule.linear` (DDPM) or
    `NoiseSchedule.cosine` (improved DDPM). Tensors are float64 on the CPU; `to(device)` returns a copy
    on another device (float32 where the device has no float64, as on Apple's MPS).
    """

    def __init__(self, betas: Tensor | list[float]) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]; got values outside that range")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha-bar_{t-1}, with alpha-bar_0 = 1 before the first step (the paper's x_0 is noise free).
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta-tilde_t I)  (DDPM eqs. 6-7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        # log SNR(t) = log(a_t / (1 - a_t)), what fractional timesteps interpolate (`log_snr_at`).
        self.log_snr = (self.alphas_cumprod / (1.0 - self.alphas_cumprod)).log()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Linearly increasing betas (DDPM section 4: 1e-4 to 0.02 over T = 1000 steps)."""
        return cls(torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Cosine schedule of Nichol & Dhariwal, "Improved DDPM" (2021), eq. 17.

        alpha-bar(t) = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2); betas clipped at
        `max_beta` (0.999 in the paper) to avoid the singularity at t = T.
        """
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return cls(betas.clamp(max=max_beta))

    @classmethod
    def from_name(cls, name: str, timesteps: int = 1000, **kwargs: float) -> NoiseSchedule:
        """`"linear"` or `"cosine"`; keyword arguments go to that constructor."""
        builders = {"linear": cls.linear, "cosine": cls.cosine}
        if name not in builders:
            raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(builders)}")
        return builders[name](timesteps, **kwargs)

    @classmethod
    def from_diffusers(cls, config: dict | str | os.PathLike) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config (`scheduler_config.json` of DDPMScheduler, DDIMScheduler,
        ...): a dict, the JSON file, or a folder holding it (directly or in `scheduler/`).

        Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` ("linear", "scaled_linear" or
        "squaredcos_cap_v2", which is our `cosine`) and `trained_betas`. Sampler settings (clip_sample,
        timestep_spacing, variance_type, ...) are not part of a schedule and are ignored. Raises ValueError for
        what we cannot reproduce: other beta schedules, zero-terminal-SNR rescaling, and models that predict
        anything but eps (our samplers take an eps-predictor).
        """
        if not isinstance(config, dict):
            path = Path(config)
            for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
                if candidate.is_file():
                    config = json.loads(candidate.read_text())
                    break
            else:
                raise FileNotFoundError(f"{path}: no scheduler_config.json here or in {path / 'scheduler'}")
        name = config.get("_class_name", "scheduler")
        problems = []
        if config.get("prediction_type", "epsilon") != "epsilon":
            problems.append(f"prediction_type={config['prediction_type']!r} (our samplers need an eps-predictor)")
        if config.get("rescale_betas_zero_snr", False):
            problems.append("rescale_betas_zero_snr=True (not implemented here)")
        timesteps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(start, end, timesteps, dtype=torch.float64)
        elif kind == "scaled_linear":
            # Latent diffusion's schedule: linear in sqrt(beta).
            betas = torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            # diffusers' name for the improved-DDPM cosine schedule (s = 0.008, betas capped at 0.999).
            betas = cls.cosine(timesteps).betas
        else:
            problems.append(f"beta_schedule={kind!r} (supported: linear, scaled_linear, squaredcos_cap_v2)")
        if problems:
            raise ValueError(f"{name} config has no NoiseSchedule equivalent: " + "; ".join(problems))
        return cls(betas)

    # ------------------------------------------------------------------ properties
    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) (Kingma et al., "Variational Diffusion
        Models", 2021)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy whose tensors live on `device` (computed from the float64 CPU betas)."""
        device = torch.device(device)
        new = NoiseSchedule.__new__(NoiseSchedule)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        for name, value in vars(self).items():
            setattr(new, name, value.to(device=device, dtype=dtype, copy=True) if isinstance(value, Tensor) else value)
        return new

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
            f"beta[-1]={self.betas[-1].item():.3g})"
        )

    # ------------------------------------------------------------------ forward process
    # num_timesteps, alpha_sigma and snr_at are what the losses and parameterization.py ask of a schedule; a
    # `process.DiffusionProcess` answers the same three at continuous t.
    def log_snr_at(self, t: Tensor) -> Tensor:
        """log SNR(t), float64 on the schedule's device: the table at integer t; at fractional t (the SDE / ODE
        samplers' continuous noise levels) linear between floor(t) and ceil(t), which is linear in EDM's
        log sigma = -log SNR / 2, as `continuous.DiscreteSigmaDenoiser.t_to_sigma` interpolates."""
        t = torch.as_tensor(t).to(self.betas.device)
        if not t.is_floating_point():
            return self.log_snr[t]
        t = t.to(self.betas.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_timesteps - 1)
        w = t - low
        return (1 - w) * self.log_snr[low] + w * self.log_snr[high]

    def alpha_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(alpha-bar_t) and sigma_t = sqrt(1 - alpha-bar_t) of timesteps t (B,), broadcast against x
        (B, ...) in its dtype: the float64 tables at integer t; at fractional t from the interpolated log SNR
        (`log_snr_at`; alpha^2 = sigmoid(log SNR), sigma^2 = sigmoid(-log SNR))."""
        if not t.is_floating_point():
            return extract(self.sqrt_alphas_cumprod, t, x), extract(self.sqrt_one_minus_alphas_cumprod, t, x)
        alpha, sigma = alpha_sigma_from_log_snr(self.log_snr_at(t), x.ndim)
        return alpha.to(device=x.device, dtype=x.dtype), sigma.to(device=x.device, dtype=x.dtype)

    def snr_at(self, t: Tensor) -> Tensor:
        """SNR(t) of timesteps t, float64 on the schedule's device (interpolated at fractional t: `log_snr_at`)."""
        if not torch.as_tensor(t).is_floating_point():
            return self.snr[t.to(self.betas.device)]
        return self.log_snr_at(t).exp()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I)  (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise


def schedule_recipe(name: str, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> dict:
    """The `NoiseSchedule.from_name` arguments of the modules' schedule options (`beta_start` / `beta_end` apply to
    "linear" only), as an export records them: `NoiseSchedule.from_name(**schedule_recipe(...))`."""
    return {"name": name, "timesteps": int(timesteps)} | (
        {"beta_start": float(beta_start), "beta_end": float(beta_end)} if name == "linear" else {}
    )
