"""Samplers: pure functions of (model, x, schedule), no Lightning.

A denoiser is any callable `model(x_t, t) -> eps` with `t` an int64 tensor of 0-based timesteps, one per
batch element. Every sampler runs under `torch.no_grad()`, computes its coefficients in float64 from the
schedule and applies them in the dtype of `x`. Pass a `torch.Generator` to make stochastic samplers
reproducible; `progress=True` shows a tqdm bar; `callback(dict(x=..., x0=..., i=..., t=...))` sees every
intermediate state (for notebooks and animations) without the sampler knowing about it.

Notation (0-based t): a_t = alpha-bar_t = alphas_cumprod[t], and a_{-1} = 1 (the clean image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from src.diffusion.k_samplers import CONTINUOUS_OPTIONS, CONTINUOUS_SAMPLERS, SAMPLER_OPTIONS, continuous_sample
from src.diffusion.likelihood import interpolated_log_variance
from src.diffusion.parameterization import EpsPredictor, X0Clip, eps_from_x0, threshold_x0, x0_from_eps
from src.diffusion.registry import config_error, import_function
from src.diffusion.schedule import NoiseSchedule
from src.diffusion.score import annealed_langevin_sample
from src.seeding import randn_like

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]
# One generator for the batch, or one per sample (see `randn_like`); None: torch's global RNG.
Generator = torch.Generator | Sequence[torch.Generator] | None

SKIP_TYPES = ("uniform", "quad", "trailing", "linspace", "logsnr")
DDPM_VARIANCES = ("fixed_small", "fixed_large")


# ---------------------------------------------------------------------------------------------- helpers
def timestep_sequence(num_timesteps: int, steps: int, skip: str = "uniform") -> list[int]:
    """The ascending sub-sequence tau of {0, ..., T-1} that a `steps`-step sampler visits.

    - "uniform": `range(0, T, T // steps)`, as the DDIM authors' reference code (`generalized_steps`). When `steps` does
      not divide T this yields more than `steps` entries (e.g. T=1000, steps=300 gives 334), exactly as there.
    - "quad": `int(s)` for s in `linspace(0, sqrt(0.8 T), steps) ** 2` (DDIM paper, appendix D.2; used for
      CIFAR-10). For many steps its first entries repeat (0, 0, 0, ...); a repeated timestep is an exact
      no-op step in DDIM, so it is kept for fidelity to the reference code.
    - "trailing": `round(arange(T, 0, -T / steps)) - 1`, which always includes t = T - 1 (Lin et al. 2024,
      "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2; diffusers' "trailing").
    - "linspace": `round(linspace(0, T - 1, steps))` (diffusers' "linspace").
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the schedule's T), got {steps}")
    if skip == "uniform":
        return list(range(0, num_timesteps, num_timesteps // steps))
    if skip == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2]
    if skip == "trailing":
        # [:steps]: with a float step, arange can return one extra value near 0 that would become t = -1
        # (diffusers' DDIMScheduler has that off-by-one).
        seq = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)[:steps]).astype(np.int64) - 1
        return sorted(int(s) for s in seq)
    if skip == "linspace":
        return [int(s) for s in np.linspace(0, num_timesteps - 1, steps).round()]
    if skip == "logsnr":
        raise ValueError("skip='logsnr' depends on the schedule: use logsnr_timesteps(schedule, steps)")
    raise ValueError(f"unknown skip {skip!r}; choose one of {', '.join(SKIP_TYPES)}")


def logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """`steps` timesteps uniform in lambda = log(alpha / sigma) (half the log-SNR) from t = T - 1 to t = 0, each
    rounded to the nearest discrete t and deduplicated: DPM-Solver's "logSNR" spacing (Lu et al. 2022, DPM-Solver
    section 3.3 / appendix, recommended for pixel-space models). Uniform steps in lambda keep the step ratios
    r_i = h_{i-1} / h_i of multistep solvers near 1; uniform-in-t grids on the linear schedule end with one huge
    lambda step (t = T / steps -> 0) where DPM-Solver++(2M) extrapolates badly.

    Always exactly `steps` distinct timesteps: where several targets round to the same t (lambda jumps between
    neighbouring t, as at the cosine schedule's clipped last beta, or many steps are asked for), the later
    duplicates move to the next free t, keeping the order."""
    T = schedule.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the schedule's T), got {steps}")
    a = schedule.alphas_cumprod.cpu().to(torch.float64).numpy()
    lam = 0.5 * (np.log(a) - np.log1p(-a))
    targets = np.linspace(lam[-1], lam[0], steps)
    nearest = sorted(int(np.abs(lam - target).argmin()) for target in targets)
    # Strictly increasing: push each duplicate up past its predecessor, then pull the tail back under T - 1. Both
    # passes keep the order, and a t that was already distinct from its neighbours stays where it was.
    for k in range(1, steps):
        nearest[k] = max(nearest[k], nearest[k - 1] + 1)
    return [min(t, T - steps + k) for k, t in enumerate(nearest)]


def predict_x0_from_eps(x_t: Tensor, eps: Tensor, alpha_cumprod_t: float) -> Tensor:
    """x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) for a_t = alpha-bar_t given as a number (`x0_from_eps`)."""
    return x0_from_eps(x_t, eps, math.sqrt(alpha_cumprod_t), math.sqrt(1.0 - alpha_cumprod_t))


def ddim_sigma(alpha_cumprod_t: float, alpha_cumprod_prev: float, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)  (DDIM eq. 16).

    eta = 1 gives DDPM's posterior standard deviation (sqrt of beta-tilde) on the sub-sequence; eta = 0 the
    deterministic DDIM.
    """
    if eta == 0.0:
        return 0.0
    return eta * math.sqrt(
        (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod_t) * (1.0 - alpha_cumprod_t / alpha_cumprod_prev)
    )


def ddim_step(x0: Tensor, eps: Tensor, alpha_cumprod_prev: float, sigma: float, noise: Tensor | None) -> Tensor:
    """x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z  (DDIM eq. 12).

    The three terms are the paper's "predicted x_0", "direction pointing to x_t" and "random noise".
    """
    x_prev = math.sqrt(alpha_cumprod_prev) * x0 + math.sqrt(max(1.0 - alpha_cumprod_prev - sigma**2, 0.0)) * eps
    if sigma > 0.0:
        x_prev = x_prev + sigma * noise
    return x_prev


def _timestep_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)


def _denoise(
    model: Denoiser, x: Tensor, t: int, alpha_cumprod: float, clip_x0: X0Clip = False
) -> tuple[Tensor, Tensor]:
    """eps_theta(x, t) and the x_0 it implies for noise level `alpha_cumprod`.

    With `clip_x0` (True: clamp to [-1, 1]; a `DynamicThreshold`: Imagen's dynamic thresholding; `threshold_x0`),
    x_0 is bounded and eps re-derived from the bounded x_0, so the pair still satisfies eq. 4
    (x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps), as improved DDPM / ADM's `ddim_sample` does (diffusers:
    `use_clipped_model_output=True`). Keeping the raw eps next to a clamped x_0 makes DDIM's eq. 12 step off the
    trajectory a little at every step: harmless at 10-100 steps, broken images at 1,000.
    """
    eps = model(x, _timestep_batch(t, x)).to(x.dtype)
    x0 = predict_x0_from_eps(x, eps, alpha_cumprod)
    if clip_x0:
        x0 = threshold_x0(x0, clip_x0)
        eps = eps_from_x0(x, x0, math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod))
    return eps, x0


def _alpha_cumprod(schedule: NoiseSchedule, t: int) -> float:
    """a_t as a Python float (float64), with a_{-1} = 1."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _check_sequence(seq: Sequence[int], num_timesteps: int) -> list[int]:
    seq = [int(s) for s in seq]
    if not seq or any(b < a for a, b in zip(seq, seq[1:], strict=False)) or seq[0] < 0 or seq[-1] >= num_timesteps:
        raise ValueError(f"timesteps must be a non-empty ascending sequence in [0, {num_timesteps}), got {seq}")
    return seq


def respace(schedule: NoiseSchedule, timesteps: Sequence[int]) -> NoiseSchedule:
    """The schedule of the chain that visits only `timesteps` tau (Nichol & Dhariwal 2021, section 4; their
    `space_timesteps`): beta_i = 1 - a_{tau_i} / a_{tau_{i-1}} with a_{tau_{-1}} = 1, so that its alpha-bar_i is
    a_{tau_i} exactly and its beta-tilde_i is the true posterior variance between tau_{i-1} and tau_i."""
    seq = _check_sequence(timesteps, schedule.num_timesteps)
    if len(set(seq)) != len(seq):
        raise ValueError(f"a respaced schedule needs distinct timesteps, got {seq}")
    abar = schedule.alphas_cumprod.cpu().to(torch.float64)[seq]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return NoiseSchedule(1.0 - abar / abar_prev)


def learned_log_variance(v: Tensor, schedule: NoiseSchedule, t: int) -> Tensor:
    """log Sigma_theta = v' log beta_t + (1 - v') log beta-tilde_t, v' = (v + 1) / 2 (Improved DDPM eq. 15; the
    network's v in [-1, 1] is mapped to [0, 1] as in their code). beta-tilde_0 = 0, so at t = 0 its log is taken
    from t = 1 (their `posterior_log_variance_clipped`); samplers add no noise at t = 0 anyway."""
    var = schedule.posterior_variance
    min_log = math.log(float(var[t] if t > 0 else var[1] if len(var) > 1 else schedule.betas[0]))
    max_log = math.log(float(schedule.betas[t]))
    return interpolated_log_variance(v, min_log, max_log)


# ---------------------------------------------------------------------------------------------- samplers
@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int = 50,
    eta: float = 0.0,
    skip: str = "uniform",
    generator: Generator = None,
    timesteps: Sequence[int] | None = None,
    clip_x0: X0Clip = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM sampling (Song, Meng & Ermon 2021, eq. 12) on the sub-sequence `timestep_sequence(T, steps, skip)`
    or on an explicit ascending `timesteps` sequence.

    With eta = 0 it returns what the DDIM authors' `generalized_steps(x_T, seq, model, betas, eta=0)` returns as its
    last `xs` element; eta = 1 is DDPM-like ancestral sampling on the sub-sequence. `clip_x0` bounds the
    predicted x_0 at every step (True: clamp to [-1, 1], off in the DDIM reference code; a `DynamicThreshold`:
    Imagen's dynamic thresholding; `parameterization.threshold_x0`).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM-like), got {eta}")
    T = schedule.num_timesteps
    seq = _check_sequence(timesteps, T) if timesteps is not None else timestep_sequence(T, steps, skip)
    seq_prev = [-1] + seq[:-1]
    x = x_T
    pairs = list(zip(reversed(seq), reversed(seq_prev), strict=True))
    for i, (t, t_prev) in enumerate(tqdm(pairs, desc="DDIM", disable=not progress, leave=False)):
        a_t, a_prev = _alpha_cumprod(schedule, t), _alpha_cumprod(schedule, t_prev)
        eps, x0 = _denoise(model, x, t, a_t, clip_x0)
        sigma = ddim_sigma(a_t, a_prev, eta)
        x = ddim_step(x0, eps, a_prev, sigma, randn_like(x, generator) if sigma > 0 else None)
        if callback is not None:
            callback({"x": x, "x0": x0, "i": i, "t": t})
    return x


@torch.no_grad()
def ddpm_sample(
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    variance: str = "fixed_small",
    generator: Generator = None,
    clip_x0: X0Clip = False,
    progress: bool = False,
    callback: Callback | None = None,
    timesteps: Sequence[int] | None = None,
    variance_gamma: float | None = None,
) -> Tensor:
    """Ancestral sampling over all T steps (DDPM Algorithm 2):

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - a_t) eps_theta(x_t, t)) + sigma_t z,

    written through the posterior mean mu-tilde(x_t, x_0-hat) of eq. 7, which is the same expression and
    allows `clip_x0` (the DDPM reference code clips x_0-hat to [-1, 1]; Algorithm 2 does not). No noise is
    added at the last step. `variance`: "fixed_small" sigma_t^2 = beta-tilde_t (the posterior variance) or
    "fixed_large" sigma_t^2 = beta_t (section 3.2; the paper found both give similar samples), or "learned":
    the model outputs 2C channels (eps, v) and sigma_t^2 = exp(v' log beta_t + (1 - v') log beta-tilde_t) with
    v' = (v + 1) / 2 (Nichol & Dhariwal 2021, "Improved DDPM", eq. 15, and their code's `model_var_values`).

    `timesteps`: an ascending sub-sequence tau of {0, ..., T-1} to sample on a respaced schedule (Improved DDPM
    section 4): `respace(schedule, tau)` with beta_i = 1 - a_{tau_i} / a_{tau_{i-1}}, the model still called at the
    original tau_i; all three variances (the learned one included) then use the respaced betas and beta-tildes.

    `variance_gamma` in [0, 1]: sigma_t^2 = beta-tilde_t^(1 - gamma) beta_t^gamma instead of `variance`, the
    interpolation of the Imagen Video sampler (Ho et al. 2022, "Imagen Video", eq. 6: (sigma-tilde^2_{s|t})^(1 - gamma)
    (sigma^2_{t|s})^gamma, the posterior and the forward step's variance): 0 is "fixed_small" and 1 "fixed_large",
    step for step (exactly: x^1 y^0 = x). Not with a learned variance.
    """
    if variance not in DDPM_VARIANCES + ("learned",):
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(DDPM_VARIANCES)}, learned")
    if variance_gamma is not None:
        if variance == "learned":
            raise ValueError("variance_gamma interpolates the fixed variances; a learned variance is the model's own")
        if not 0.0 <= variance_gamma <= 1.0:
            raise ValueError(f"variance_gamma must be in [0, 1] (0: fixed_small, 1: fixed_large), got {variance_gamma}")
    # model_t[i]: the model's timestep for step i of the (possibly respaced) chain.
    if timesteps is not None:
        model_t = _check_sequence(timesteps, schedule.num_timesteps)
        schedule = respace(schedule, model_t)
    else:
        model_t = list(range(schedule.num_timesteps))
    variances = schedule.posterior_variance if variance == "fixed_small" else schedule.betas
    if variance_gamma is not None:
        gamma = float(variance_gamma)
        variances = schedule.posterior_variance ** (1.0 - gamma) * schedule.betas**gamma
    x = x_T
    T = schedule.num_timesteps
    for i, t in enumerate(tqdm(range(T - 1, -1, -1), desc="DDPM", disable=not progress, leave=False)):
        a_t = _alpha_cumprod(schedule, t)
        if variance == "learned":
            out = model(x, _timestep_batch(model_t[t], x)).to(x.dtype)
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"variance='learned' needs a model with 2 x {x.shape[1]} outputs, got {out.shape[1]}")
            eps, v = out[:, : x.shape[1]], out[:, x.shape[1] :]
            x0 = predict_x0_from_eps(x, eps, a_t)
            x0 = threshold_x0(x0, clip_x0)
        else:
            eps, x0 = _denoise(model, x, model_t[t], a_t, clip_x0)
        x = float(schedule.posterior_mean_coef_x0[t]) * x0 + float(schedule.posterior_mean_coef_xt[t]) * x
        if t > 0:
            if variance == "learned":
                x = x + torch.exp(0.5 * learned_log_variance(v, schedule, t)) * randn_like(x, generator)
            else:
                x = x + math.sqrt(float(variances[t])) * randn_like(x, generator)
        if callback is not None:
            callback({"x": x, "x0": x0, "i": i, "t": model_t[t]})
    return x


@torch.no_grad()
def ddim_invert(
    model: Denoiser,
    x_0: Tensor,
    schedule: NoiseSchedule,
    steps: int = 50,
    skip: str = "uniform",
    timesteps: Sequence[int] | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM encoding x_0 -> x_T: the eta = 0 update of `ddim_sample` run forwards in time
    (DDIM section 4.3: the probability-flow ODE integrated from t = 0 to T).

    Each step from the less noisy t_prev to t reuses eq. 12 with the roles of a_t and a_prev swapped, and
    evaluates eps_theta(x_{t_prev}, t) in place of the unknown eps_theta(x_t, t) (the usual explicit
    approximation, as in diffusers' DDIMInverseScheduler); the error vanishes as the steps shrink.
    """
    T = schedule.num_timesteps
    seq = _check_sequence(timesteps, T) if timesteps is not None else timestep_sequence(T, steps, skip)
    seq_prev = [-1] + seq[:-1]
    x = x_0
    pairs = list(zip(seq_prev, seq, strict=True))
    for i, (t_prev, t) in enumerate(tqdm(pairs, desc="DDIM inversion", disable=not progress, leave=False)):
        a_prev, a_t = _alpha_cumprod(schedule, t_prev), _alpha_cumprod(schedule, t)
        eps, x0 = _denoise(model, x, t, a_prev)  # eps at the target timestep t, applied to x_{t_prev}
        x = ddim_step(x0, eps, a_t, 0.0, None)
        if callback is not None:
            callback({"x": x, "x0": x0, "i": i, "t": t})
    return x


def _lambda(alpha_cumprod: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(a / (1 - a)), the half log-SNR (DPM-Solver's time variable)."""
    return 0.5 * (math.log(alpha_cumprod) - math.log1p(-alpha_cumprod))


@torch.no_grad()
def dpm_solver_pp_2m_sample(
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    steps: int = 20,
    skip: str = "uniform",
    timesteps: Sequence[int] | None = None,
    clip_x0: X0Clip = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): a second-order multistep solver of the probability-flow ODE in data prediction
    x_theta = x_0-hat, on the same timestep grid as `ddim_sample` (`timestep_sequence(T, steps, skip)`).

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma) and h_i = lambda_{t_i} - lambda_{t_{i-1}}:

        x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
        D_1 = x_theta(x_{t_0}, t_0)                                         (first step: first order = DDIM)
        D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}) - 1 / (2 r_i) x_theta(x_{t_{i-2}}),   r_i = h_{i-1} / h_i

    The final step to the clean image (a = 1, sigma = 0, h = infinity) is taken first order, x_0 = x_theta, as
    in k-diffusion's `sample_dpmpp_2m` and diffusers' `lower_order_final` (r_i -> 0 there would blow D up); that
    step is also exactly DDIM's last step. One model evaluation per step, like DDIM.
    """
    T = schedule.num_timesteps
    seq = _check_sequence(timesteps, T) if timesteps is not None else timestep_sequence(T, steps, skip)
    seq = sorted(set(seq))  # a repeated timestep (quad spacing) has h = 0: a no-op that would make r_i undefined
    seq_prev = [-1] + seq[:-1]
    x = x_T
    x0_prev, h_prev = None, None
    pairs = list(zip(reversed(seq), reversed(seq_prev), strict=True))
    for i, (t, t_next) in enumerate(tqdm(pairs, desc="DPM-Solver++(2M)", disable=not progress, leave=False)):
        a_t, a_next = _alpha_cumprod(schedule, t), _alpha_cumprod(schedule, t_next)
        _, x0 = _denoise(model, x, t, a_t, clip_x0)
        if t_next < 0:
            x = x0  # sigma_next = 0: x_0 = alpha_next x_theta with alpha_next = 1
        else:
            h = _lambda(a_next) - _lambda(a_t)
            if x0_prev is None:
                d = x0  # Algorithm 2, line 3: the first step is first order (DPM-Solver++1 = DDIM)
            else:
                r = h_prev / h
                d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
            sigma_ratio = math.sqrt((1.0 - a_next) / (1.0 - a_t))
            x = sigma_ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"x": x, "x0": x0, "i": i, "t": t})
    return x


# ---------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class SamplerEntry:
    """A built-in sampler as `sample` runs it: `run(model, x_T, schedule, *, steps, eta, skip, variance, generator,
    clip_x0, progress, callback, prediction, **options) -> x_0`, the `arguments` of those four (steps, eta, skip,
    variance) it reads, the `sampler_options` it reads, and whether it evaluates the model at continuous noise levels
    (`continuous`: it gets the net's own output and `prediction`, and converts it at each exact level; the discrete
    ones get an eps-predictor at integer timesteps). `SamplerSettings` refuses what a sampler does not read."""

    run: Callable[..., Tensor]
    arguments: tuple[str, ...]
    options: tuple[str, ...] = ()
    continuous: bool = False


def _grid(schedule: NoiseSchedule, steps: int, skip: str) -> list[int] | None:
    # skip="logsnr" (DPM-Solver's spacing) needs the schedule, so it is resolved here into explicit timesteps.
    return logsnr_timesteps(schedule, steps) if skip == "logsnr" else None


def _run_ddim(model, x_T, schedule, *, steps, eta, skip, generator, clip_x0, progress, callback, **_) -> Tensor:
    return ddim_sample(model, x_T, schedule, steps=steps, eta=eta, skip=skip, generator=generator,
                       timesteps=_grid(schedule, steps, skip), clip_x0=clip_x0, progress=progress, callback=callback)  # fmt: skip


def _run_ddpm(model, x_T, schedule, *, variance, generator, clip_x0, progress, callback, variance_gamma=None, **_):
    return ddpm_sample(model, x_T, schedule, variance=variance, generator=generator, clip_x0=clip_x0,
                       progress=progress, callback=callback, variance_gamma=variance_gamma)  # fmt: skip


def _run_ddpm_respaced(model, x_T, schedule, *, steps, skip, variance, generator, clip_x0, progress, callback,
                       variance_gamma=None, **_):  # fmt: skip
    seq = _grid(schedule, steps, skip) or sorted(set(timestep_sequence(schedule.num_timesteps, steps, skip)))
    return ddpm_sample(model, x_T, schedule, variance=variance, generator=generator, clip_x0=clip_x0,
                       progress=progress, callback=callback, timesteps=seq, variance_gamma=variance_gamma)  # fmt: skip


def _run_dpmpp_2m(model, x_T, schedule, *, steps, skip, clip_x0, progress, callback, **_) -> Tensor:
    return dpm_solver_pp_2m_sample(model, x_T, schedule, steps=steps, skip=skip, timesteps=_grid(schedule, steps, skip),
                                   clip_x0=clip_x0, progress=progress, callback=callback)  # fmt: skip


def _run_langevin(model, x_T, schedule, *, steps, skip, generator, clip_x0, progress, callback, langevin_steps=100,
                  step_lr=2e-5, final_denoise=1.0, **_) -> Tensor:  # fmt: skip
    seq = _grid(schedule, steps, skip) or sorted(set(timestep_sequence(schedule.num_timesteps, steps, skip)))
    return annealed_langevin_sample(model, x_T, schedule, seq, langevin_steps=int(langevin_steps), step_lr=step_lr,
                                    final_denoise=bool(final_denoise), generator=generator, clip_x0=clip_x0,
                                    progress=progress, callback=callback)  # fmt: skip


def _continuous(name: str) -> Callable[..., Tensor]:
    def run(model, x_T, schedule, *, steps, generator, clip_x0, progress, callback, prediction, **options) -> Tensor:
        for unused in ("eta", "skip", "variance"):
            options.pop(unused, None)
        return continuous_sample(model, x_T, schedule, name, steps, generator, prediction, progress, clip_x0=clip_x0,
                                 callback=callback, **options)  # fmt: skip

    return run


# Every built-in sampler, by its `--model.sampling.sampler` name: the one place a new one is registered (an SDE / ODE
# sampler registers in `k_samplers.K_SAMPLERS` instead, and appears here with its options).
BUILTIN_SAMPLERS: dict[str, SamplerEntry] = {
    "ddim": SamplerEntry(_run_ddim, ("steps", "eta", "skip")),
    "ddpm": SamplerEntry(_run_ddpm, ("variance",), ("variance_gamma",)),  # all T steps
    "ddpm_respaced": SamplerEntry(_run_ddpm_respaced, ("steps", "skip", "variance"), ("variance_gamma",)),
    "dpmpp_2m": SamplerEntry(_run_dpmpp_2m, ("steps", "skip")),
    # NCSN's annealed Langevin dynamics on `steps` noise levels (skip linspace includes the largest and smallest)
    "langevin": SamplerEntry(_run_langevin, ("steps", "skip"), ("langevin_steps", "step_lr", "final_denoise")),
    # on `steps` Karras noise levels, at continuous noise levels
    **{name: SamplerEntry(_continuous(name), ("steps",), SAMPLER_OPTIONS[name], True) for name in CONTINUOUS_SAMPLERS},
}
SAMPLERS = tuple(BUILTIN_SAMPLERS)
# The arguments of `sample` that each built-in sampler reads, besides `clip_x0` (all of them) and its
# `sampler_options`. `SamplerSettings` refuses a value other than the default for an argument the chosen sampler
# does not read, so no setting is silently ignored.
SAMPLER_ARGUMENTS: dict[str, tuple[str, ...]] = {name: entry.arguments for name, entry in BUILTIN_SAMPLERS.items()}
# Every `sampler_options` name some built-in sampler reads, with the type its value is read as: a count is an int, a
# switch a bool, the rest floats (`option_value` checks a given value against it).
OPTION_TYPES: dict[str, type] = {
    "rho": float, "churn": float, "snr": float, "corrector_steps": int, "solver_order": int, "quantize": bool,
    "variance_gamma": float, "langevin_steps": int, "step_lr": float, "final_denoise": bool,
}  # fmt: skip
OPTION_NAMES: tuple[str, ...] = tuple(OPTION_TYPES)
_WANTED = {bool: ("true or false", "true"), int: ("a whole number", "2"), float: ("a number", "7.0")}


def option_value(name: str, value: object) -> float | int | bool:
    """`value` of the sampler option `name` as the type it is read as (`OPTION_TYPES`), or a one-line ValueError: a
    bool takes true / false (or 1 / 0), an int a whole number (3 or 3.0, not 2.5), a float any number, and no
    option takes a bool in place of a number or a string."""
    kind = OPTION_TYPES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and (isinstance(value, bool) or (number and value in (0, 1))):
        return bool(value)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    wanted, example = _WANTED[kind]
    raise config_error(f"--model.sampling.options {name}: {value!r} is not {wanted}; e.g. {{{name}: {example}}}")


def option_readers(option: str) -> list[str]:
    """The built-in samplers that read the sampler option `option`."""
    return [name for name, entry in BUILTIN_SAMPLERS.items() if option in entry.options]


def is_continuous(sampler: object) -> bool:
    """Whether `sampler` is a built-in that evaluates the model at continuous noise levels (`SamplerEntry`)."""
    entry = BUILTIN_SAMPLERS.get(sampler) if isinstance(sampler, str) else None
    return bool(entry and entry.continuous)


# ---------------------------------------------------------------------------------------------- your own sampler
# A sampler of one's own is a function, in any importable file, selected by its dotted path (`--model.sampling.sampler
# my_project.samplers.euler`) or passed to `sample` as the function itself. `sample` calls it as
#
#     x_0 = function(model, x_T, schedule, steps=..., eta=..., skip=..., variance=..., generator=...,
#                    timesteps=..., clip_x0=..., progress=..., callback=..., **sampler_options)
#
# under torch.no_grad(), with the same meanings as for the built-ins:
# - `model(x_t, t) -> eps`: an eps-predictor whatever the net predicts (x0 / v nets are wrapped by `EpsPredictor`;
#   guidance is already applied); `t` is an int64 tensor of 0-based timesteps, one per batch element.
# - `x_T`: the starting noise (B, C, H, W); return x_0 of the same shape, images in [-1, 1].
# - `schedule`: the `NoiseSchedule` (float64 `alphas_cumprod`, `betas`; cast at the point of use).
# - `timesteps`: the ascending timesteps that `steps` and `skip` select (`timestep_sequence`, or `logsnr_timesteps`
#   for skip "logsnr"), ready to visit from the last to the first; `eta`, `variance`, `clip_x0` as in `ddim_sample`
#   and `ddpm_sample`, for a sampler that has such a knob. `clip_x0` is False, True or a `DynamicThreshold`: bound
#   x_0-hat with `parameterization.threshold_x0(x0, clip_x0)`, which does all three.
# - `generator`: one torch.Generator or one per sample: draw noise with `randn_like(x, generator)`, so that sample i
#   of `predict` depends on its seed alone, whatever the batch.
# - `callback`: None, or a function to call with a dict of each step's state ({"x", "i", "x0", "t"} as the built-ins).
# Take `**options` for the keywords the sampler does not use.
SamplerFunction = Callable[..., Tensor]


def sampler_function(path: str) -> SamplerFunction:
    """The sampler function that the dotted path `path` ("package.module.function") names; a one-line ConfigError
    when it does not import."""
    return import_function(path, "--model.sampling.sampler", SAMPLERS)


def check_sampler(sampler: str) -> None:
    """Pass for a built-in name or an importable dotted path to a sampler function; a one-line ConfigError else."""
    if sampler not in SAMPLERS:
        sampler_function(sampler)


@torch.no_grad()
def _sample_with(
    function: SamplerFunction,
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    steps: int,
    skip: str,
    **options: object,
) -> Tensor:
    """`function` called with the convention above."""
    if prediction != "eps":
        model = EpsPredictor(model, schedule, prediction)
    if skip == "logsnr":
        timesteps = logsnr_timesteps(schedule, steps)
    else:
        timesteps = timestep_sequence(schedule.num_timesteps, steps, skip)
    return function(model, x_T, schedule, steps=steps, skip=skip, timesteps=timesteps, **options)


def sample(
    model: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    sampler: str | SamplerFunction = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    skip: str = "uniform",
    variance: str = "fixed_small",
    generator: Generator = None,
    clip_x0: X0Clip = False,
    progress: bool = False,
    prediction: str = "eps",
    callback: Callback | None = None,
    **sampler_options: float,
) -> Tensor:
    """Run the sampler named `sampler` (`BUILTIN_SAMPLERS`): "ddim" (`steps`, `eta`, `skip`), "ddpm" (all T steps,
    `variance`), "ddpm_respaced" (ancestral sampling on the respaced schedule of `timestep_sequence(T, steps,
    skip)`, `variance`; Improved DDPM section 4), "dpmpp_2m" (DPM-Solver++(2M), `steps`, `skip`), or one of the SDE /
    probability-flow ODE samplers of k_samplers.py (euler_maruyama, pc, heun, dpmpp_3m, unipc, ipndm) on `steps`
    Karras noise levels, whose `sampler_options` (`rho`, `churn`, `snr`, `corrector_steps`, `solver_order`,
    `quantize`: see `k_samplers.continuous_sample`) are checked per sampler: one it does not read is a ValueError.

    `prediction` is what `model` outputs ("eps", "x0", "v" or "edm"): the discrete samplers see it as an eps-predictor,
    the continuous ones convert it at each exact noise level. `sampler` may also be a function of your own, or its
    dotted path "package.module.function", called with the convention described above `SamplerFunction`. `clip_x0`: how
    every sampler bounds x_0-hat (False, True: clamp to [-1, 1], or a `parameterization.DynamicThreshold`).
    `callback(dict)` sees every step of every sampler: "x" and "i" always, with "x0" and "t" (discrete) or "denoised"
    and "sigma" (continuous, x in the x~ = x / alpha variable)."""
    if callable(sampler) or (sampler not in BUILTIN_SAMPLERS and "." in sampler):  # your own: the convention above
        function = sampler if callable(sampler) else sampler_function(sampler)
        return _sample_with(function, model, x_T, schedule, prediction, steps, skip, eta=eta, variance=variance,
                            generator=generator, clip_x0=clip_x0, progress=progress, callback=callback,
                            **sampler_options)  # fmt: skip
    entry = BUILTIN_SAMPLERS.get(sampler)
    if entry is None:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if entry.continuous:
        unknown = sorted(set(sampler_options) - set(CONTINUOUS_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown sampler option(s) {', '.join(unknown)}; choose from {', '.join(CONTINUOUS_OPTIONS)}"
            )
    else:
        unread = sorted(set(sampler_options) - set(entry.options))
        if unread:
            raise ValueError(f"sampler {sampler!r} does not read the option(s) {', '.join(unread)}; it takes "
                             f"{', '.join(entry.options) or 'none'}")  # fmt: skip
    if not entry.continuous and prediction != "eps":
        model = EpsPredictor(model, schedule, prediction)
    return entry.run(model, x_T, schedule, steps=steps, eta=eta, skip=skip, variance=variance, generator=generator,
                     clip_x0=clip_x0, progress=progress, callback=callback, prediction=prediction,
                     **sampler_options)  # fmt: skip
