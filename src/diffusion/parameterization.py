"""What the network predicts: eps, x_0 or v, and the exact conversions between them (the one place they live).

With alpha_t = sqrt(a_t) and sigma_t = sqrt(1 - a_t) (a_t = alpha-bar_t, so alpha_t^2 + sigma_t^2 = 1) and
x_t = alpha_t x_0 + sigma_t eps (DDPM eq. 4):

    eps = (x_t - alpha_t x_0) / sigma_t                    x_0 = (x_t - sigma_t eps) / alpha_t   (DDPM eq. 15)
    v   = alpha_t eps - sigma_t x_0                        (Salimans & Ho 2022, "Progressive Distillation", sec. 4)
    x_0 = alpha_t x_t - sigma_t v                          eps = sigma_t x_t + alpha_t v         (ibid., appendix D)

Training regresses the chosen target with the unweighted L_simple form ||target - f_theta(x_t, t)||^2
(`src.diffusion.losses.l_simple`). Samplers only ever see an eps-predictor: `EpsPredictor` wraps a network of any
parameterisation (the style of EDM's preconditioning wrappers: the architecture does not change). Extra output
channels beyond the image's (the learned-variance v of improved DDPM) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from src.diffusion.schedule import NoiseSchedule, extract

PREDICTIONS = ("eps", "x0", "v")


def _alpha_sigma(schedule: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t), broadcast against x in its dtype."""
    return extract(schedule.sqrt_alphas_cumprod, t, x), extract(schedule.sqrt_one_minus_alphas_cumprod, t, x)


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def training_target(prediction: str, x0: Tensor, noise: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The regression target of L_simple for `prediction`: eps (DDPM eq. 14), x_0, or v = alpha eps - sigma x_0."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * noise - sigma * x0


def eps_from_prediction(prediction: str, output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """eps implied by the network output in the `prediction` parameterisation at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "eps":
        return output
    return eps_from_output(prediction, output, x_t, *_alpha_sigma(schedule, t, x_t))


def eps_from_output(prediction: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps implied by the network output at x_t = alpha x_0 + sigma eps, for any (also continuous) alpha and sigma
    with alpha^2 + sigma^2 = 1: eps = (x_t - alpha x_0) / sigma, or sigma x_t + alpha v."""
    if prediction == "eps":
        return output
    if prediction == "x0":
        return (x_t - alpha * output) / sigma
    return sigma * x_t + alpha * output


def x0_from_prediction(prediction: str, output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """x_0 implied by the network output in the `prediction` parameterisation at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "x0":
        return output
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha
    return alpha * x_t - sigma * output


def prediction_from_eps(prediction: str, eps: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The inverse of `eps_from_prediction`: what a `prediction`-network outputs when it means `eps`."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    x0 = (x_t - sigma * eps) / alpha
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
