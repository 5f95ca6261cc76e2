"""Negative log-likelihood in bits/dim from the variational bound (DDPM, Ho et al. 2020, eq. 5 and section 3.3).

    L_vlb = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                                  (prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))          (eq. 5; Gaussian KLs, eqs. 6-7)
    L_0     = -log p_theta(x_0 | x_1), the discretized Gaussian decoder     (eq. 13)

as the official code's `diffusion_utils_2.GaussianDiffusion.calc_bpd_loop` computes it for the paper's NLL column
(Table 1): p_theta(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat), sigma_t^2) with x0_hat from the predicted eps and
a fixed variance, "fixed_small" (beta-tilde_t) or "fixed_large" (beta_t), the first entry of either replaced by
beta-tilde of the paper's t = 2 (0-based 1) since beta-tilde at t = 1 is zero. Images are 8-bit data scaled to
[-1, 1]; bits/dim = L_vlb / (D ln 2).

Notation: 0-based t as in `schedule.py`, so the paper's L_0 (decoder) is our t = 0 and the prior is at t = T - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from src.diffusion.parameterization import X0Clip, threshold_x0, x0_from_eps
from src.diffusion.schedule import NoiseSchedule, extract
from src.seeding import generator_device

Denoiser = Callable[[Tensor, Tensor], Tensor]
VARIANCES = ("fixed_small", "fixed_large")  # and "learned", read from the model's output (`vb_terms`)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats (the official code's `normal_kl`):

    0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int = 256) -> Tensor:
    """log P(x) of the discretized Gaussian decoder (DDPM eq. 13), elementwise, in nats.

    `x` holds 8-bit values scaled to [-1, 1]; the bin of x is [x - 1/255, x + 1/255], widened to -inf at
    x = -1 and +inf at x = 1, so the `levels` probabilities sum to 1. As the official code's
    `discretized_gaussian_log_likelihood`, with the exact normal CDF (the official one uses the tanh
    approximation of GELU, off by up to ~3e-4 in the CDF) and the same floor of 1e-12 on probabilities.
    """
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    # The edge bins get the same floor as the interior ones (the official code clamps cdf_plus and 1 - cdf_min at
    # 1e-12 too): without it a confident wrong edge pixel has an unbounded NLL, which the bound then sums.
    log_floor = math.log(1e-12)
    log_cdf_upper = torch.special.log_ndtr(upper).clamp(min=log_floor)  # the bin (-inf, x + 1/255] at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower).clamp(min=log_floor)  # the bin [x - 1/255, inf) at x = 1
    # Phi(upper) - Phi(lower), taken in the tail where it does not cancel.
    delta = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def posterior_log_variance(schedule: NoiseSchedule) -> Tensor:
    """log beta-tilde_t with the t = 0 entry (zero variance) replaced by t = 1's: the official code's
    `posterior_log_variance_clipped`."""
    var = schedule.posterior_variance
    return torch.log(torch.cat([var[1:2], var[1:]]))


def model_log_variance(schedule: NoiseSchedule, variance: str = "fixed_small") -> Tensor:
    """log sigma_t^2 of p_theta(x_{t-1} | x_t) (DDPM section 3.2): "fixed_small" beta-tilde_t, "fixed_large"
    beta_t; at t = 0 both use beta-tilde_1, as the official code (`np.append(posterior_variance[1], betas[1:])`)."""
    if schedule.num_timesteps < 2:
        raise ValueError("the variational bound needs T >= 2")
    if variance == "fixed_small":
        return posterior_log_variance(schedule)
    if variance == "fixed_large":
        return torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")


def interpolated_log_variance(v: Tensor, min_log: Tensor | float, max_log: Tensor | float) -> Tensor:
    """A learned variance's log Sigma_theta = v' log beta_t + (1 - v') log beta-tilde_t with v' = (v + 1) / 2 (Improved
    DDPM, Nichol & Dhariwal 2021, eq. 15; the network's v in [-1, 1] mapped to [0, 1] as in their code), given
    `min_log` = log beta-tilde_t and `max_log` = log beta_t. The one place the training bound, the likelihood and the
    "learned" DDPM sampler interpolate it."""
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def learned_log_variance_bounds(schedule: NoiseSchedule, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log beta-tilde_t, log beta_t) of `interpolated_log_variance` at timesteps t, broadcast against x; beta-tilde_0 = 0
    is replaced by beta-tilde_1 (`posterior_log_variance`), beta_0 is kept, as their code's `p_mean_variance`."""
    return extract(posterior_log_variance(schedule), t, x), extract(torch.log(schedule.betas), t, x)


def gaussian_bound_term(
    x0: Tensor, x_t: Tensor, x0_hat: Tensor, t: Tensor, schedule: NoiseSchedule, model_logvar: Tensor
) -> Tensor:
    """One term of the bound, elementwise, in nats, for p_theta(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_hat),
    e^model_logvar): KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (DDPM eq. 5-7) where t > 0, and the
    discretized decoder NLL -log p_theta(x_0 | x_1) (eq. 13) where t = 0. The one place the bound's terms are
    written: `vb_terms` (the likelihood) and `losses.learned_variance_vb` / `losses.l_vlb` (training) reduce it."""
    coef_x0 = extract(schedule.posterior_mean_coef_x0, t, x0)
    coef_xt = extract(schedule.posterior_mean_coef_xt, t, x0)
    model_mean = coef_x0 * x0_hat + coef_xt * x_t  # mu-tilde(x_t, x0_hat), eq. 7
    true_mean = coef_x0 * x0 + coef_xt * x_t
    true_logvar = extract(posterior_log_variance(schedule), t, x0)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    return torch.where(t.reshape(-1, *([1] * (x0.ndim - 1))) == 0, decoder_nll, kl)


def prior_kl(x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) summed over dimensions, per example (B,), in nats."""
    a_T = schedule.alphas_cumprod[-1].to(x0.device, x0.dtype)
    mean = a_T.sqrt() * x0
    logvar = torch.log1p(-a_T).expand_as(x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).sum(dim=1)


def vb_terms(
    model: Denoiser,
    x0: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    noise: Tensor,
    variance: str = "fixed_small",
    clip_x0: X0Clip = False,
) -> Tensor:
    """One term of the bound per example (B,), in nats: the decoder NLL -log p(x_0 | x_1) where t = 0, else
    KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), with x_t = q_sample(x_0, t, noise). `variance` "learned":
    the model outputs (eps, v) (2C channels) and the variance is interpolated by v (`interpolated_log_variance`).

    Computed in x0's dtype (use float64); the model sees x_t in its parameters' usual float32.
    """
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t.float(), t).to(x0.dtype)
    channels = x0.shape[1]
    eps = out[:, :channels]
    a_t = extract(schedule.alphas_cumprod, t, x0)
    x0_hat = x0_from_eps(x_t, eps, a_t.sqrt(), (1.0 - a_t).sqrt())  # DDPM eq. 15
    x0_hat = threshold_x0(x0_hat, clip_x0)  # as the samplers bound it (False: unchanged)
    if variance == "learned":
        if out.shape[1] != 2 * channels:
            raise ValueError(f"variance='learned' needs a model with 2 x {channels} outputs, got {out.shape[1]}")
        model_logvar = interpolated_log_variance(out[:, channels:], *learned_log_variance_bounds(schedule, t, x0))
    else:
        model_logvar = extract(model_log_variance(schedule, variance), t, x0)
    return gaussian_bound_term(x0, x_t, x0_hat, t, schedule, model_logvar).flatten(1).sum(dim=1)


def bound_timesteps(
    num_timesteps: int, batch_size: int, num: int | None = None, generator: torch.Generator | None = None
) -> list[tuple[Tensor, int]]:
    """(t, weight) pairs of the KL terms in {1, ..., T-1} that the bound evaluates, t an int64 (B,) tensor.

    Every t with weight 1 when `num` is None or >= T - 1 (exact); else stratified sampling: {1, ..., T-1} is cut
    into `num` contiguous strata and each example draws one t uniformly from each, weighted by the stratum's
    size: an unbiased estimate of the sum whose variance averages out over examples.
    """
    if num is None or num >= num_timesteps - 1:
        return [(torch.full((batch_size,), t, dtype=torch.int64), 1) for t in range(1, num_timesteps)]
    if num < 1:
        raise ValueError(f"need at least one KL timestep, got {num}")
    strata = np.array_split(np.arange(1, num_timesteps), num)
    pairs = []
    for stratum in strata:  # drawn on the generator's device (a CUDA generator cannot draw a CPU tensor)
        t = torch.randint(0, len(stratum), (batch_size,), generator=generator, device=generator_device(generator))
        pairs.append((int(stratum[0]) + t.cpu(), len(stratum)))
    return pairs


@torch.no_grad()
def nll_bits_per_dim(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    num_timesteps: int | None = None,
    variance: str = "fixed_small",
    clip_x0: X0Clip = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The variational bound L_vlb per example, in bits/dim: {"bpd", "prior_bpd", "decoder_bpd", "kl_bpd"}.

    Sums the KL terms over all t = 1..T-1 (exact) or, with `num_timesteps`, estimates the sum without bias from
    that many stratified draws (`bound_timesteps`). The decoder and the prior terms are always computed. Everything is computed in
    float64 (float32 where the schedule is, e.g. on MPS).
    """
    T = schedule.num_timesteps
    dtype = schedule.betas.dtype
    x = x0.to(dtype)
    batch, dims = x.shape[0], x[0].numel()

    def term(t: Tensor) -> Tensor:
        noise = (
            torch.randn(x.shape, generator=generator, device=generator.device, dtype=dtype).to(x.device)
            if generator
            else torch.randn_like(x)
        )
        return vb_terms(model, x, t.to(x.device), schedule, noise, variance, clip_x0)

    kl = sum(weight * term(t) for t, weight in bound_timesteps(T, batch, num_timesteps, generator))
    decoder = term(torch.zeros(batch, dtype=torch.int64))
    prior = prior_kl(x, schedule)
    to_bpd = 1.0 / (dims * math.log(2.0))
    return {
        "bpd": (prior + kl + decoder) * to_bpd,
        "prior_bpd": prior * to_bpd,
        "decoder_bpd": decoder * to_bpd,
        "kl_bpd": kl * to_bpd,
    }
