"""Continuous-time views of a discrete diffusion model: noise levels sigma instead of timesteps, no Lightning.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM), section 2 and
eqs. 4-6, write every diffusion SDE of Song et al. 2021 ("Score-Based Generative Modeling through Stochastic
Differential Equations") as x = s(t) (x_0 + sigma(t) n). For the VP SDE of a DDPM schedule
s = alpha = sqrt(a_t) and sigma = sqrt((1 - a_t) / a_t); for the VE SDE (NCSN) s = 1. The samplers of
`k_samplers.py` work in the rescaled variable x~ = x / s, where every SDE is the variance-exploding one,

    x~ = x_0 + sigma n,      probability-flow ODE  dx~/dsigma = (x~ - D(x~; sigma)) / sigma   (EDM eq. 3 with s = 1),

with D(x~; sigma) ~= E[x_0 | x~] the denoiser. The wrappers here turn a network trained on discrete timesteps
into that D at any sigma, as k-diffusion's `DiscreteEpsDDPMDenoiser` does: the timestep fed to the network is
interpolated linearly in log sigma between the two neighbouring discrete timesteps (`sigma_to_t`). The UNet's
sinusoidal timestep embedding accepts fractional t, and an x_0- or v-network's output is converted to eps here at
the exact level (`DiscreteSigmaDenoiser.__call__`), which is how `DiffusionModel.sample` calls these samplers.
`EpsPredictor`'s conversion and both guidances read the schedule at fractional t too (`NoiseSchedule.alpha_sigma`);
only a callable that looks a table up by integer t needs `quantize=True`, which rounds to the nearest discrete
noise level instead (k-diffusion's `quantize`).

Noise-level grids: `karras_sigmas` (EDM eq. 5, rho = 7), `exponential_sigmas` (uniform in log sigma = uniform in
DPM-Solver's lambda), `vp_sigmas` (every level of a DDPM schedule) and `ve_sigmas` (NCSN's geometric levels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from src.diffusion.parameterization import X0Clip, check_prediction, eps_from_output, threshold_x0, x0_from_eps
from src.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x~, sigma) -> x_0-hat, sigma a (B,) tensor


def append_zero(sigmas: Tensor) -> Tensor:
    """The grid with a final sigma = 0: the last step of every sampler lands on the clean image."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1, then 0
    (EDM eq. 5; rho = 7 balances the truncation error over the levels, their figure 13). Float64, descending."""
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n levels uniform in log sigma from sigma_max to sigma_min, then 0: uniform steps in DPM-Solver's
    lambda = -log sigma (Lu et al. 2022, section 3.3, "logSNR" spacing)."""
    if n < 1:
        raise ValueError(f"need at least one noise level, got n={n}")
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def vp_sigmas(schedule: NoiseSchedule) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) of each discrete timestep t (ascending in t), float64: the noise level of
    x_t / sqrt(a_t) = x_0 + sigma_t eps (DDPM eq. 4 divided by sqrt(a_t))."""
    a = schedule.alphas_cumprod.detach().cpu().to(torch.float64)
    return ((1.0 - a) / a).sqrt()


def ve_sigmas(sigma_min: float, sigma_max: float, num: int) -> Tensor:
    """The geometric NCSN noise levels sigma_min (sigma_max / sigma_min)^(i / (num - 1)) (Song & Ermon 2019,
    section 4.2; Song et al. 2021, VE SDE eq. 30), ascending like timesteps, float64."""
    if num < 2:
        raise ValueError(f"need at least two VE noise levels, got {num}")
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), num, dtype=torch.float64).exp()


class DiscreteSigmaDenoiser:
    """D(x~; sigma) of a network `model(x_t, t)` trained on the discrete noise levels `sigmas[t]` (ascending).

    `prediction` is what the network outputs ("eps", "x0", "v" or "edm"); all but eps are converted at the continuous
    noise level here, so fractional timesteps work for them too. `quantize` rounds the timestep to the nearest
    discrete level in log sigma. `clip_x0` bounds D (True: clamp to [-1, 1]; a `DynamicThreshold`: Imagen's dynamic
    thresholding; `parameterization.threshold_x0`); the samplers' derivative (x~ - D) / sigma then is the eps
    re-derived from the bounded x_0, as `samplers._denoise` does. Subclasses say how x~ maps to the
    network's input (`input_scale`).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        sigmas: Tensor,
        prediction: str = "eps",
        quantize: bool = False,
        clip_x0: X0Clip = False,
    ) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the discrete noise levels must be an ascending 1-D sequence of at least two")
        self.model = model
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.prediction = check_prediction(prediction)
        self.quantize = quantize
        self.clip_x0 = clip_x0

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep of noise level sigma: linear interpolation in log sigma between the two
        neighbouring discrete levels, clamped to [0, T - 1] (k-diffusion's `DiscreteSchedule.sigma_to_t`). With
        `quantize`, the index of the nearest level in log sigma instead."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().log()
        dists = log_sigma - self.log_sigmas[:, None]
        if self.quantize:
            return dists.abs().argmin(dim=0).reshape(log_sigma.shape).to(torch.float64)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.numel() - 2)
        high = low + 1
        w = ((self.log_sigmas[low] - log_sigma.flatten()) / (self.log_sigmas[low] - self.log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(log_sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The inverse of `sigma_to_t`: log sigma interpolated linearly between floor(t) and ceil(t)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def input_scale(self, sigma: Tensor) -> Tensor:
        """c_in: the network sees c_in x~ (1 for VE; the VP subclass overrides it)."""
        return torch.ones_like(sigma)

    def prior_std(self, sigma: float) -> float:
        """Standard deviation of the isotropic Gaussian that x~ at noise level sigma is assumed to follow for
        large sigma (the SDE's prior p_T, in the x~ variable)."""
        return sigma

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x_0-hat = D(x~; sigma) for x~ of shape (B, ...) and sigma of shape (B,) (or a number)."""
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64).cpu().expand(x.shape[0])
        t = self.sigma_to_t(sigma64)
        t_model = (
            t.to(torch.int64) if self.quantize else t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        )
        c_in = self.input_scale(sigma64)
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_in_x = c_in.to(x.device, x.dtype).reshape(shape)
        s = sigma64.to(x.device, x.dtype).reshape(shape)
        out = self.model(x * c_in_x, t_model.to(x.device)).to(x.dtype)
        if self.prediction != "eps":
            # The network's output means x_0 or v at its own level sigma_t (sigma itself unless quantized): converted
            # to eps there (Salimans & Ho 2022, appendix D, with alpha = c_in(sigma_t), sigma_VP = sigma_t alpha),
            # then used like an eps-network's output, as k-diffusion's discrete denoisers use eps.
            level = self.t_to_sigma(t) if self.quantize else sigma64
            alpha = self.input_scale(level).to(x.device, x.dtype).reshape(shape)
            sigma_vp = alpha * level.to(x.device, x.dtype).reshape(shape)
            out = eps_from_output(self.prediction, out, x * c_in_x, alpha, sigma_vp)
        denoised = x0_from_eps(x, out, 1.0, s)  # x~ = x_0 + sigma eps (alpha = 1 in this variable)
        return threshold_x0(denoised, self.clip_x0)


class DiscreteVPDenoiser(DiscreteSigmaDenoiser):
    """The VP SDE of a DDPM schedule in EDM's form: sigma_t = sqrt((1 - a_t) / a_t), and the network sees
    x_t = sqrt(a_t) x~ = x~ / sqrt(1 + sigma^2) (k-diffusion's `DiscreteEpsDDPMDenoiser`; EDM table 1, VP column,
    c_in = 1 / sqrt(sigma^2 + 1), D = x~ - sigma eps)."""

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: str = "eps",
        quantize: bool = False,
        clip_x0: X0Clip = False,
    ) -> None:
        super().__init__(model, vp_sigmas(schedule), prediction, quantize, clip_x0)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma**2 + 1.0).sqrt()

    def prior_std(self, sigma: float) -> float:
        """x_T ~ N(0, I) in the VP variable, so x~ = x_T / sqrt(a_T) ~ N(0, (1 + sigma^2) I)."""
        return math.sqrt(1.0 + sigma**2)


class DiscreteVEDenoiser(DiscreteSigmaDenoiser):
    """The VE SDE (NCSN, Song et al. 2021 eq. 9): x_t = x_0 + sigma_t eps, the network fed x~ unscaled at the
    discrete levels `sigmas` (ascending, e.g. `ve_sigmas`). A score network s(x, t) ~= grad log p is the eps
    network -sigma s(x, t) (Vincent 2011); wrap it so before passing it here."""

    def __init__(
        self,
        model: Callable[..., Tensor],
        sigmas: Sequence[float] | Tensor,
        prediction: str = "eps",
        quantize: bool = False,
        clip_x0: X0Clip = False,
    ) -> None:
        if prediction == "v":
            raise ValueError("v-prediction is defined for VP models only; use prediction='eps' or 'x0'")
        super().__init__(model, torch.as_tensor(sigmas, dtype=torch.float64), prediction, quantize, clip_x0)
