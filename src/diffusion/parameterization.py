"""What the network predicts: eps, x_0 or v, and the exact conversions between them (the one place they live).

With alpha_t = sqrt(a_t) and sigma_t = sqrt(1 - a_t) (a_t = alpha-bar_t, so alpha_t^2 + sigma_t^2 = 1) and
x_t = alpha_t x_0 + sigma_t eps (DDPM eq. 4):

    eps = (x_t - alpha_t x_0) / sigma_t                    x_0 = (x_t - sigma_t eps) / alpha_t   (DDPM eq. 15)
    v   = alpha_t eps - sigma_t x_0                        (Salimans & Ho 2022, "Progressive Distillation", sec. 4)
    x_0 = alpha_t x_t - sigma_t v                          eps = sigma_t x_t + alpha_t v         (ibid., appendix D)
    x_0 = c_skip x_t + c_out F                             "edm": EDM's preconditioning (Karras et al. 2022, eq. 7)

"edm" is EDM's D(x~; s) = c_skip(s) x~ + c_out(s) F(...) with x~ = x_t / alpha_t, s = sigma_t / alpha_t,
c_skip = sigma_data^2 / (s^2 + sigma_data^2) and c_out = s sigma_data / sqrt(s^2 + sigma_data^2) (Table 1), written
in x_t: with r_t = sqrt(sigma_t^2 + alpha_t^2 sigma_data^2), x_0 = (sigma_data^2 alpha_t / r_t^2) x_t
+ (sigma_t sigma_data / r_t) F, and the target F = (sigma_t x_0 - sigma_data^2 alpha_t eps) / (sigma_data r_t).
Regressing F unweighted is EDM's loss weighting lambda = 1 / c_out^2. sigma_data is EDM's 0.5 (`EDM_SIGMA_DATA`, data
in [-1, 1]); with sigma_data = 1, F = -v: v-prediction is this preconditioning at sigma_data = 1. One difference from
EDM: c_in is not applied, the network sees x_t itself, since the VP scaling already bounds its input (std r_t in
[sigma_data, 1] for data of std sigma_data, where EDM's variance-exploding x~ reaches s^2 + sigma_data^2 = 80^2), and
every network call site would otherwise have to scale it.

Training regresses the chosen target with the unweighted L_simple form ||target - f_theta(x_t, t)||^2
(`src.diffusion.losses.l_simple`). Samplers only ever see an eps-predictor: `EpsPredictor` wraps a network of any
parameterisation (the style of EDM's preconditioning wrappers: the architecture does not change). Extra output
channels beyond the image's (the learned-variance v of improved DDPM) pass through untouched.

`threshold_x0` bounds the x_0 these imply, the one place every sampler does: not at all, clamped to [-1, 1], or by
Imagen's dynamic thresholding (`DynamicThreshold`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from src.diffusion.schedule import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v", "edm")
# EDM's sigma_data, the standard deviation of the data its preconditioning assumes (Karras et al. 2022, Table 1).
EDM_SIGMA_DATA = 0.5


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x_0 = (x_t - sigma eps) / alpha: x_t = alpha x_0 + sigma eps (DDPM eq. 4) solved for x_0 (eq. 15; DDIM's
    f_theta, eq. 9). alpha and sigma as tensors broadcasting against x_t or as numbers; alpha = 1 and sigma = EDM's
    sigma in the variance-exploding variable x~ = x_0 + sigma eps. The one place this equation is written."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """eps = (x_t - alpha x_0) / sigma, the same equation solved for eps (how a bounded x_0-hat re-derives eps)."""
    return (x_t - alpha * x0) / sigma


def edm_coefficients(
    alpha: Tensor | float, sigma: Tensor | float, sigma_data: float = EDM_SIGMA_DATA
) -> tuple[Tensor | float, Tensor | float]:
    """(c_skip', c_out) with x_0 = c_skip' x_t + c_out F: EDM's c_skip / alpha_t (x~ = x_t / alpha_t) and c_out, in
    terms of x_t = alpha_t x_0 + sigma_t eps (module docstring)."""
    r2 = sigma**2 + (alpha * sigma_data) ** 2
    return sigma_data**2 * alpha / r2, sigma * sigma_data / r2**0.5


def x0_from_edm(x_t: Tensor, output: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x_0 = c_skip' x_t + c_out F: EDM's denoiser D (eq. 7) from the network's output F, in x_t's terms."""
    c_skip, c_out = edm_coefficients(alpha, sigma)
    return c_skip * x_t + c_out * output


def edm_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """F = (x_0 - c_skip' x_t) / c_out, the same equation solved for F (EDM's effective training target, eq. 8)."""
    c_skip, c_out = edm_coefficients(alpha, sigma)
    return (x0 - c_skip * x_t) / c_out


def training_target(prediction: str, x0: Tensor, noise: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The regression target of L_simple for `prediction`: eps (DDPM eq. 14), x_0, v = alpha eps - sigma x_0, or
    EDM's F = (x_0 - c_skip' x_t) / c_out."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha, sigma = schedule.alpha_sigma(t, x0)
    if prediction == "edm":
        return edm_from_x0(alpha * x0 + sigma * noise, x0, alpha, sigma)
    return alpha * noise - sigma * x0


def eps_from_prediction(prediction: str, output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """eps implied by the network output in the `prediction` parameterisation at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "eps":
        return output
    return eps_from_output(prediction, output, x_t, *schedule.alpha_sigma(t, x_t))


def eps_from_output(prediction: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps implied by the network output at x_t = alpha x_0 + sigma eps, for any (also continuous) alpha and sigma
    with alpha^2 + sigma^2 = 1: eps = (x_t - alpha x_0) / sigma, or sigma x_t + alpha v."""
    if prediction == "eps":
        return output
    if prediction == "x0":
        return eps_from_x0(x_t, output, alpha, sigma)
    if prediction == "edm":
        return eps_from_x0(x_t, x0_from_edm(x_t, output, alpha, sigma), alpha, sigma)
    return sigma * x_t + alpha * output


def x0_from_prediction(prediction: str, output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """x_0 implied by the network output in the `prediction` parameterisation at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "x0":
        return output
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha, sigma)
    if prediction == "edm":
        return x0_from_edm(x_t, output, alpha, sigma)
    return alpha * x_t - sigma * output


def prediction_from_eps(prediction: str, eps: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The inverse of `eps_from_prediction`: what a `prediction`-network outputs when it means `eps`."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    x0 = x0_from_eps(x_t, eps, alpha, sigma)
    if prediction == "edm":
        return edm_from_x0(x_t, x0, alpha, sigma)
    return x0 if prediction == "x0" else alpha * eps - sigma * x0


class EpsPredictor:
    """`model(x_t, t, *args) -> output` in the `prediction` parameterisation, seen as an eps-predictor.

    The first `x_t.shape[1]` output channels are converted; any further ones (a learned variance's v) are
    returned unchanged after them. The conversion runs in float64 where the schedule is float64 and is cast back
    to x_t's dtype, since sigma_t -> 0.01 at t = 0 makes x0 -> eps lose digits in float32.
    """

    def __init__(self, model: Callable[..., Tensor], schedule: NoiseSchedule, prediction: str = "eps") -> None:
        # A plain callable, not an nn.Module: it is built at sampling time and must not add the wrapped weights to
        # anyone's state_dict a second time.
        self.model = model
        self.schedule = schedule
        self.prediction = check_prediction(prediction)
        # A conditional net's label count, so that classifier_free_guidance finds its null label through the wrapper.
        self.num_classes = getattr(model, "num_classes", None)

    def __call__(self, x_t: Tensor, t: Tensor, *args: object, **kwargs: object) -> Tensor:
        out = self.model(x_t, t, *args, **kwargs)
        if self.prediction == "eps":
            return out
        channels = x_t.shape[1]
        schedule = self.schedule if self.schedule.betas.device == x_t.device else self.schedule.to(x_t.device)
        work = schedule.betas.dtype
        eps = eps_from_prediction(self.prediction, out[:, :channels].to(work), x_t.to(work), schedule, t)
        return torch.cat([eps.to(out.dtype), out[:, channels:]], dim=1)


# ---------------------------------------------------------------------------------------------- bounding x_0-hat
@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding of x_0-hat (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models
    with Deep Language Understanding", section 2.3 and appendix): per sample, s is the `percentile` quantile of
    |x_0-hat| over all pixels, at least 1 and at most `max_value` (None: no upper bound, as in the paper);
    x_0-hat is clipped to [-s, s] and divided by s. `percentile` is a fraction (0.995, not 99.5), as diffusers'
    `dynamic_thresholding_ratio`; `max_value` is diffusers' `sample_max_value`, whose default 1 makes s = 1 always:
    the static clip to [-1, 1]."""

    percentile: float
    max_value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 1.0:
            raise ValueError(f"the dynamic threshold percentile is a fraction in (0, 1] (0.995), got {self.percentile}")
        if self.max_value is not None and not self.max_value >= 1.0:
            raise ValueError(f"the dynamic threshold's max_value must be at least 1 (s >= 1), got {self.max_value}")


# How x_0-hat is bounded at each step: False (not at all), True (clamped to [-1, 1]) or a DynamicThreshold. The
# samplers' `clip_x0` argument; `threshold_x0` applies it.
X0Clip = bool | DynamicThreshold


def dynamic_threshold(x0: Tensor, percentile: float, max_value: float | None = None) -> Tensor:
    """x_0-hat clipped to [-s, s] and divided by s, s = clamp(quantile(|x_0-hat|, percentile), 1, max_value) per
    sample (Imagen, section 2.3: "we set s to a certain percentile absolute pixel value in x_0-hat, and if s > 1, we
    threshold x_0-hat to the range [-s, s] and then divide by s"). Computed as diffusers'
    `DDPMScheduler._threshold_sample` does (torch.quantile's linear interpolation; half precision in float32)."""
    flat = x0.flatten(1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), percentile, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(work, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def threshold_x0(x0: Tensor, clip: X0Clip) -> Tensor:
    """x_0-hat bounded as `clip` says: unchanged (False), clamped to [-1, 1] (True: the dynamic threshold with s fixed
    at 1, as the DDPM reference code's `clip_denoised`) or dynamically thresholded (a `DynamicThreshold`). The one
    place every sampler, the continuous denoisers and the variational bound bound x_0-hat."""
    if isinstance(clip, DynamicThreshold):
        return dynamic_threshold(x0, clip.percentile, clip.max_value)
    return x0.clamp(-1.0, 1.0) if clip else x0
