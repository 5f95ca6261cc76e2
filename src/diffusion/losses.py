"""Training objectives.

`l_simple` is DDPM's simplified objective (Ho et al. 2020, eq. 14 and Algorithm 1):

    L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t) ||^2

with t uniform over the T steps. The per-example mean over pixels is returned so that callers can weight
or mask examples before averaging; `l_simple(..., weighting=loss_weighting(NAME))` weights each example by a
function of its SNR(t) (Min-SNR-gamma, Hang et al. 2023, or one's own).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from src.diffusion.likelihood import (
    gaussian_bound_term,
    interpolated_log_variance,
    learned_log_variance_bounds,
    model_log_variance,
)
from src.diffusion.parameterization import EDM_SIGMA_DATA, PREDICTIONS, training_target, x0_from_prediction
from src.diffusion.registry import config_error, import_function
from src.diffusion.schedule import NoiseSchedule, extract

Denoiser = Callable[..., Tensor]
# A loss weighting: weight(snr, prediction) -> per-example weights, snr = SNR(t) of each example (B,), float64.
LossWeight = Callable[[Tensor, str], Tensor]
LOSS_WEIGHTINGS = ("none", "min_snr")
# How a batch draws its timesteps (`unit_times`); every method leaves each example's t uniform.
TIMESTEP_SAMPLINGS = ("uniform", "antithetic", "low_discrepancy", "stratified")


def unit_times(
    batch_size: int,
    method: str = "uniform",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """u in [0, 1) for each example, float64, by `method` (`TIMESTEP_SAMPLINGS`): "uniform" i.i.d.; "antithetic"
    pairs u and 1 - u (the first half drawn); "low_discrepancy" u_i = (u_0 + i / B) mod 1 with one u_0 (VDM's
    sampler, appendix, the reference's `antithetic_time_sampling`); "stratified" u_i = (pi(i) + U_i) / B, one
    i.i.d. draw in each of B strata, pi a random permutation. Each is uniform per example, so every estimate stays
    unbiased; the last three spread the batch over [0, 1) and lower the variance of its mean."""
    draw_device = generator.device if generator is not None else device

    def rand(n: int) -> Tensor:
        return torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)

    if method == "uniform":
        u = rand(batch_size)
    elif method == "antithetic":
        half = rand((batch_size + 1) // 2)
        u = torch.cat([half, 1.0 - half])[:batch_size]
    elif method == "low_discrepancy":
        u = torch.remainder(
            rand(1) + torch.arange(batch_size, device=draw_device, dtype=torch.float64) / batch_size, 1.0
        )
    elif method == "stratified":
        strata = torch.randperm(batch_size, generator=generator, device=draw_device).to(torch.float64)
        u = (strata + rand(batch_size)) / batch_size
    else:
        raise ValueError(f"unknown timestep sampling {method!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    return u.clamp(max=1.0 - 1e-12).to(device)


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    method: str = "uniform",
) -> Tensor:
    """t ~ Uniform({0, ..., T-1}), int64 (Algorithm 1, line 3), on `device`; drawn on the generator's device.
    `method` other than "uniform": t = floor(u T) of `unit_times(method)`, each t still uniform ("antithetic" then
    pairs t with T - 1 - t, the seed implementation's trick)."""
    if method != "uniform":
        u = unit_times(batch_size, method, device, generator)
        return (u * num_timesteps).floor().long().clamp(max=num_timesteps - 1)
    if generator is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device)
    return torch.randint(0, num_timesteps, (batch_size,), device=generator.device, generator=generator).to(device)


class TimestepDistribution:
    """Where training puts its noise levels: each example's u in [0, 1) (`unit_times`, so the batch's variance
    reduction applies as before) mapped to a timestep of `schedule`. Without one (`--model.timestep_distribution
    null`) t is uniform over the T steps, DDPM's Algorithm 1. A subclass of one's own is chosen by class path.

    Drawing t from p(t) with an unweighted loss trains the objective weighted by T p(t), with a lower variance than
    drawing t uniformly and weighting by T p(t) (importance sampling; EDM section 5, "Loss weighting and sampling").
    """

    def __call__(self, u: Tensor, schedule: NoiseSchedule) -> Tensor:
        raise NotImplementedError


class LogNormal(TimestepDistribution):
    """EDM's training noise levels (Karras et al. 2022, Table 1): ln sigma ~ N(mean, std^2), -1.2 and 1.2 there, in
    the variance-exploding sigma_t = sqrt((1 - a_t) / a_t) of x_t / sqrt(a_t), each drawn level mapped to the
    timestep whose log sigma_t is nearest (levels beyond the schedule's ends go to its first or last step).

    It concentrates training where samples take shape (sigma about 0.1 to 2, where guidance intervals act too) instead
    of DDPM's uniform t, which spends half of a linear T = 1000 schedule's steps above sigma = 3.7. With v-prediction
    and no loss weighting (`--model.training.loss_weighting none`), the loss is EDM's lambda(sigma) ||D(x) - x_0||^2
    with sigma_data = 1: the v-error is the x_0-error times sqrt(1 + sigma^2) / sigma, i.e. EDM's 1 / c_out(sigma).
    """

    def __init__(self, mean: float = -1.2, std: float = 1.2) -> None:
        if not std > 0:
            raise config_error(f"--model.timestep_distribution LogNormal std must be > 0 (1.2 in EDM), got {std}")
        self.mean, self.std = float(mean), float(std)
        self.config = {"mean": self.mean, "std": self.std}  # recorded in checkpoints (module.net_spec)

    def __call__(self, u: Tensor, schedule: NoiseSchedule) -> Tensor:
        log_sigma = self.mean + self.std * torch.special.ndtri(u.double().clamp(1e-12, 1.0 - 1e-12))
        table = (-0.5 * schedule.log_snr).to(u.device)  # log sigma_t = -log SNR(t) / 2, increasing in t
        above = torch.searchsorted(table, log_sigma).clamp(max=len(table) - 1)  # first t with log sigma_t >= level
        below = (above - 1).clamp(min=0)
        nearer_below = (log_sigma - table[below]).abs() <= (table[above] - log_sigma).abs()
        return torch.where(nearer_below, below, above)


def min_snr_weight(snr: Tensor, prediction: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") for
    the squared error of each prediction target, from snr = SNR(t) = alpha-bar_t / (1 - alpha-bar_t):

        x0:   min(SNR, gamma)
        eps:  min(SNR, gamma) / SNR        = min(1, gamma / SNR)
        v:    min(SNR, gamma) / (SNR + 1)
        edm:  min(SNR, gamma) sigma_data^2 / (1 + SNR sigma_data^2)

    All four are the one loss min(SNR, gamma) ||x_0 - x0_hat||^2 written in the target's own error: for the same x_t,
    ||x_0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR = ||v - v_hat||^2 / (SNR + 1) = c_out^2 ||F - F_hat||^2, where EDM's
    c_out^2 = sigma_t^2 sigma_data^2 / (sigma_t^2 + alpha_t^2 sigma_data^2) = sigma_data^2 / (1 + SNR sigma_data^2).
    Clamping the x0 weight at gamma (5 in the paper) stops the nearly clean, high-SNR steps from dominating training.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    clamped = torch.clamp(snr, max=gamma)
    if prediction == "x0":
        return clamped
    if prediction == "eps":
        # min(1, gamma / SNR): equal to min(SNR, gamma) / SNR for SNR > 0, and 1 (not 0 / 0) at a zero terminal SNR.
        return torch.clamp(gamma / snr, max=1.0)
    if prediction == "edm":
        return clamped * EDM_SIGMA_DATA**2 / (1.0 + snr * EDM_SIGMA_DATA**2)
    return clamped / (snr + 1.0)


def loss_weighting(name: str = "none", min_snr_gamma: float = 5.0) -> LossWeight | None:
    """The `weighting` of `l_simple` that the option `--model.training.loss_weighting NAME` selects: None for "none"
    (DDPM's unweighted L_simple), Min-SNR-gamma with gamma = `min_snr_gamma` for "min_snr" (`min_snr_weight`), or one's
    own function `weight(snr: Tensor, prediction: str) -> Tensor` named by its dotted path "package.module.function".
    """
    if name == "none":
        return None
    if name == "min_snr":
        if not min_snr_gamma > 0:
            raise config_error(
                f"--model.training.min_snr_gamma must be > 0 (5 in Hang et al. 2023), got {min_snr_gamma}"
            )
        return functools.partial(min_snr_weight, gamma=float(min_snr_gamma))
    return import_function(name, "--model.training.loss_weighting", LOSS_WEIGHTINGS)


def _noised_output(
    model: Denoiser, x0: Tensor, schedule: NoiseSchedule, t: Tensor | None, noise: Tensor | None, model_kwargs: dict
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(t, noise, x_t, model output) of DDPM's Algorithm 1, lines 3-5: t ~ Uniform and noise ~ N(0, I) where not
    given (t drawn first), x_t = q_sample(x_0, t, noise), the model called on (x_t, t). Every objective starts here."""
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, noise)
    return t, noise, x_t, model(x_t, t, **model_kwargs)


def _split_learned_variance(out: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """(prediction, v) of a learned-variance model's 2C output channels; a ValueError for any other count."""
    if out.shape[1] != 2 * channels:
        raise ValueError(f"a learned-variance model outputs 2 x {channels} channels, got {out.shape[1]}")
    return out[:, :channels], out[:, channels:]


def _bound_bits(
    pred: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str,
    v: Tensor | None = None, variance: str = "fixed_small",
) -> Tensor:  # fmt: skip
    """The bound's term L_t per example (B,) in bits/dim, for the model's x_0-hat implied by `pred` and its reverse
    variance: interpolated by `v` (a learned variance), else the fixed `variance`. Computed in float32 (float64 for
    float64 data)."""
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    pred, x0, x_t = pred.to(work), x0.to(work), x_t.to(work)
    x0_hat = x0_from_prediction(prediction, pred, x_t, schedule, t)
    if v is None:
        model_logvar = extract(model_log_variance(schedule, variance), t, x0)
    else:
        model_logvar = interpolated_log_variance(v.to(work), *learned_log_variance_bounds(schedule, t, x0))
    terms = gaussian_bound_term(x0, x_t, x0_hat, t, schedule, model_logvar)
    return terms.flatten(1).mean(dim=1) / math.log(2.0)


def l_simple(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    prediction: str = "eps",
    weighting: LossWeight | None = None,
    **model_kwargs: object,
) -> Tensor:
    """Per-example L_simple: mean over pixels of (eps - eps_theta(x_t, t))^2, shape (B,).

    `t` and `noise` are drawn when not given (Algorithm 1, lines 3-4). Extra keyword arguments (e.g. class
    labels `y`) are passed to the model. `prediction` ("eps", "x0", "v" or "edm") is what the model predicts; the same
    unweighted squared error then regresses that target (`src.diffusion.parameterization.training_target`).
    Output channels beyond the image's (a learned variance) are ignored here; see `l_hybrid`. `weighting`
    (`loss_weighting`) multiplies each example's error by weighting(SNR(t), prediction); None: unweighted.
    """
    t, noise, _, out = _noised_output(model, x0, schedule, t, noise, model_kwargs)
    pred = out[:, : x0.shape[1]]
    target = training_target(prediction, x0, noise, schedule, t)
    # Compute the squared error in float32 even under bf16 autocast (the loss is a small difference of O(1)
    # numbers), and in float64 for a float64 net (exact Hessians in the attribution tests).
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    loss = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)
    if weighting is None:
        return loss
    snr = schedule.snr_at(t)  # float64 (B,), on the schedule's device; the weights are cast to the loss's
    return loss * weighting(snr, prediction).to(device=loss.device, dtype=loss.dtype)


def learned_variance_vb(
    pred: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, prediction: str = "eps"
) -> Tensor:
    """The L_vlb term L_t of a learned-variance model, per example (B,), in bits per dimension (Improved DDPM,
    Nichol & Dhariwal 2021, section 3.1 and their code's `_vb_terms_bpd`):

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || N(mu-tilde(x_t, x0_hat), Sigma_theta))      for t > 0 (0-based)
        L_0     = -log p_theta(x_0 | x_1), the discretized Gaussian decoder (DDPM eq. 13) at t = 0

    with log Sigma_theta = v' log beta_t + (1 - v') log beta-tilde_t, v' = (v + 1) / 2 (eq. 15; beta-tilde_0 = 0 is
    replaced by beta-tilde_1 as in `likelihood.posterior_log_variance`). Pass `pred.detach()` to stop the
    gradient of L_vlb into the mean, as the paper does so that L_simple alone drives the mean.
    """
    return _bound_bits(pred, x0, x_t, t, schedule, prediction, v=v)


def l_hybrid(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    prediction: str = "eps",
    vlb_weight: float = 0.001,
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """Improved DDPM's L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16, lambda = 0.001) for a
    model with 2C output channels (prediction, v), per example: {"loss", "mse", "vb"} each of shape (B,).

    L_vlb = sum_t L_t is estimated from the drawn t as T L_t (t uniform), with L_t in bits/dim and the mean
    detached (`learned_variance_vb`): loss = mse + lambda T vb, which is their code's `mse + vb * T / 1000`.
    """
    t, noise, x_t, out = _noised_output(model, x0, schedule, t, noise, model_kwargs)
    pred, v = _split_learned_variance(out, x0.shape[1])
    target = training_target(prediction, x0, noise, schedule, t)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    vb = learned_variance_vb(pred.detach(), v, x0, x_t, t, schedule, prediction)
    return {"loss": mse + vlb_weight * schedule.num_timesteps * vb.to(mse.dtype), "mse": mse, "vb": vb}


def l_vlb(
    model: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    prediction: str = "eps",
    variance: str = "fixed_small",
    **model_kwargs: object,
) -> dict[str, Tensor]:
    """The variational bound itself as the loss, per example: {"loss", "vb"} of shape (B,), "vb" = L_t in bits/dim
    at the drawn t and "loss" = T L_t, an unbiased estimate of sum_t L_t (the prior term L_T is constant).

    `variance`: the reverse variance of the bound, "fixed_small" (beta-tilde_t) or "fixed_large" (beta_t): DDPM's
    "true variational bound" training with fixed isotropic Sigma (Ho et al. 2020, section 3.4 and Table 2, which found
    it trains to worse samples than L_simple), or "learned": a 2C-output model's interpolated variance (Improved DDPM,
    Nichol & Dhariwal 2021, section 3.1: L_vlb alone, the mean trained through it too, unlike L_hybrid).
    """
    t, _, x_t, out = _noised_output(model, x0, schedule, t, noise, model_kwargs)
    if variance == "learned":
        pred, v = _split_learned_variance(out, x0.shape[1])
        vb = _bound_bits(pred, x0, x_t, t, schedule, prediction, v=v)
    else:
        vb = _bound_bits(out[:, : x0.shape[1]], x0, x_t, t, schedule, prediction, variance=variance)
    return {"loss": schedule.num_timesteps * vb, "vb": vb}


# --------------------------------------------------------------------------------------------- the objective
OBJECTIVES = ("simple", "hybrid", "vlb", "vdm", "vdm_discrete", "ssm")
# An objective of one's own: objective(model, x0, schedule, t, noise, prediction, **model_kwargs) -> {"loss": (B,),
# ...}: per-example losses that the module averages; other entries (B,) are logged as train/<name>. `schedule` is the
# process being trained (`src.diffusion.process`: alpha_sigma(t, x), snr_at(t), num_timesteps, q_sample).
Objective = Callable[..., dict[str, Tensor]]


def objective_function(name: str) -> Objective | None:
    """The function of `--model.training.objective NAME` when it is a dotted path of one's own
    ("package.module.function"); None for a built-in name (`OBJECTIVES`), which the module runs itself; a one-line
    ConfigError for anything else."""
    if name in OBJECTIVES:
        return None
    return import_function(name, "--model.training.objective", OBJECTIVES)
