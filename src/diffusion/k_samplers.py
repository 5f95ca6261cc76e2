"""Samplers of the continuous (SDE / probability-flow ODE) view, k-diffusion style, no Lightning.

Every sampler is `sample_<name>(model, x, sigmas, ...) -> x_0` with `model(x~, sigma) -> x_0-hat` a denoiser D
(`continuous.DiscreteVPDenoiser` wraps a trained network), `x` the starting point x~ at `sigmas[0]` (for the VP
SDE: x_T sqrt(1 + sigma_max^2)) and `sigmas` a descending float64 grid ending in 0 (`continuous.karras_sigmas`).
They work in EDM's variance-exploding variable x~ = x_0 + sigma n (Karras et al. 2022, eqs. 4-6), where

    probability-flow ODE   dx~/dsigma = (x~ - D(x~; sigma)) / sigma = eps          (`to_d`; EDM eq. 3, s = 1)
    reverse-time SDE       dx~ = -grad log p(x~; sigma) d[sigma^2] + dw-bar_{sigma^2}   (Song et al. 2021 eq. 6)
    score                  grad log p(x~; sigma) = (D(x~; sigma) - x~) / sigma^2        (Tweedie / EDM eq. 3)

On a DDPM schedule this variable is x_t / sqrt(a_t): DDIM is exactly Euler's method here (EDM section 3,
Salimans & Ho 2022), and the multistep solvers' lambda = log(alpha / sigma_VP) is -log sigma.

Every solver takes the final step to sigma = 0 as x_0 = D(x~; sigma_last), the first-order jump of DDIM and
DPM-Solver, so one model evaluation per noise level except where stated. Stochastic samplers take `generator`:
one `torch.Generator` or a list of them, one per batch row (per-sample noise streams: sample i then does not
depend on the batch it is drawn in). `callback({"x", "i", "sigma", "denoised"})` sees every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from src.diffusion.continuous import (
    DiscreteVPDenoiser,
    karras_sigmas,
)
from src.diffusion.parameterization import X0Clip
from src.diffusion.schedule import NoiseSchedule
from src.seeding import randn_like

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


# ---------------------------------------------------------------------------------------------- helpers
def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx~/dsigma = (x~ - D(x~; sigma)) / sigma, the probability-flow ODE's derivative (EDM eq. 3 / Alg. 1)."""
    return (x - denoised) / sigma


def _denoise(model: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return model(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))


def _steps(sigmas: Tensor, name: str, progress: bool) -> list[tuple[int, float, float]]:
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2 or any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)) or sigmas[-1] < 0:
        raise ValueError("sigmas must be a descending grid of at least two non-negative levels (end with 0)")
    pairs = [(i, s, s_next) for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:], strict=False))]
    return list(tqdm(pairs, desc=name, disable=not progress, leave=False))


def _report(callback: Callback | None, x: Tensor, i: int, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


# ---------------------------------------------------------------------------------------------- ODE solvers
@torch.no_grad()
def sample_euler(
    model: Denoiser, x: Tensor, sigmas: Tensor, progress: bool = False, callback: Callback | None = None
) -> Tensor:
    """Euler's method on the probability-flow ODE (EDM Algorithm 1 with the Euler step only); on a DDPM model's
    discrete levels it is DDIM with eta = 0 (Song, Meng & Ermon 2021, eq. 12; EDM section 3)."""
    for i, sigma, sigma_next in _steps(sigmas, "Euler", progress):
        denoised = _denoise(model, x, sigma)
        x = x + (sigma_next - sigma) * to_d(x, sigma, denoised)
        _report(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: Generator = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's second-order method on the ODE, with
    `churn` = S_churn > 0 first raising the noise level of each step by gamma = min(S_churn / N, sqrt(2) - 1) for
    sigma in [S_tmin, S_tmax] and adding the matching fresh noise (lines 4-6). churn = 0 is Algorithm 1 (the
    deterministic Heun sampler, 2N - 1 evaluations for N levels: the step to sigma = 0 is Euler, line 9)."""
    steps = len(sigmas) - 1
    for i, sigma, sigma_next in _steps(sigmas, "Heun", progress):
        gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1.0 + gamma)  # line 5: temporarily increase the noise level
        if gamma > 0:  # line 6: x^_i = x_i + sqrt(t^_i^2 - t_i^2) eps_i, eps_i ~ N(0, S_noise^2 I)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, generator)
        denoised = _denoise(model, x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)  # line 7: evaluate dx/dt at t^_i
        x_next = x + (sigma_next - sigma_hat) * d  # line 8: Euler step from t^_i to t_{i+1}
        if sigma_next > 0:  # lines 9-11: second-order correction unless the next level is 0
            d_next = to_d(x_next, sigma_next, _denoise(model, x_next, sigma_next))
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        _report(callback, x, i, sigma, denoised)
    return x


def _lambda(sigma: float) -> float:
    """lambda = log(alpha / sigma_VP) = -log sigma, DPM-Solver's time variable in the x~ parametrisation."""
    return -math.log(sigma)


def _multistep_order(i: int, steps: int, order: int, lower_order_final: bool, to_zero: bool) -> int:
    """The order of step i of `steps` in a multistep solver: warm-up min(order, i + 1); a last step to sigma = 0 is
    first order; with `lower_order_final` and fewer than 15 steps the last step is first order and the one before it
    at most second order (diffusers' DPMSolverMultistepScheduler, which reports it stabilises few-step sampling)."""
    this = min(order, i + 1)
    few = lower_order_final and steps < 15
    if i == steps - 1 and (to_zero or few):
        return 1
    if few and i == steps - 2:
        return min(this, 2)
    return this


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser, x: Tensor, sigmas: Tensor, progress: bool = False, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) in the x~ variable: the same update as
    `samplers.dpm_solver_pp_2m_sample`, on any sigma grid. See `sample_dpmpp_3m` for the notation."""
    return sample_dpmpp_3m(model, x, sigmas, order=2, lower_order_final=False, progress=progress, callback=callback)


@torch.no_grad()
def sample_dpmpp_3m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    order: int = 3,
    lower_order_final: bool = True,
    taylor_d2: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", section 4 and appendix: the multistep data-prediction
    solver with a third-order extrapolation), one evaluation per step. With h = lambda_next - lambda_i,
    r0 = h_{i-1} / h, r1 = h_{i-2} / h and D0 = x_theta at step i:

        x~_next = sigma_next / sigma_i x~_i - (e^-h - 1) D0 + ((e^-h - 1) / h + 1) D1 - ((e^-h - 1 + h) / h^2 - 1/2) D2
        D1_0 = (D0 - D_{i-1}) / r0, D1_1 = (D_{i-1} - D_{i-2}) / r1,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1),

    (alpha = 1 in the x~ variable), the second-order step x~_next = ... - (e^-h - 1) (D0 + D1_0 / 2) and the first
    DDIM. Orders per step as `_multistep_order`: the update and the schedule of orders of diffusers'
    `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3)`, which this equals step for step.
    k-diffusion's `sample_dpmpp_3m_sde` with eta = 0 has the same third-order update, but takes its second step with
    ((e^-h - 1) / h + 1) D1_0 and has no lower-order final steps.

    Its order of convergence is 2, not 3, for two reasons (measured on Gaussian data with the exact denoiser,
    tests/test_ode_samplers.py): D2 estimates h^2 x''/2, half the second-order Taylor term h^2 x'' that the
    coefficient (e^-h - 1 + h) / h^2 - 1/2 multiplies, so each step's local error is O(h^3) (error ratio 4 per
    halving of the steps even without warm-up error); and the first-order first step (DDIM, local error O(h^2))
    leaves an O(h^2) error whatever the later steps do. `taylor_d2=True` doubles D2, which makes the step third
    order: with the warm-up made negligible the error then falls 8x per halving (order 3.0), but on a plain grid
    the first step still limits it to order 2, and on the Karras grid of `continuous_sample` it is no more
    accurate than the published update at 10-40 steps; the default is the published update."""
    steps = len(sigmas) - 1
    history: list[tuple[Tensor, float]] = []  # (D, lambda) of the previous steps, newest last
    for i, sigma, sigma_next in _steps(sigmas, f"DPM-Solver++({order}M)", progress):
        denoised = _denoise(model, x, sigma)
        this = _multistep_order(i, steps, order, lower_order_final, float(sigmas[-1]) == 0.0)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next = _lambda(sigma), _lambda(sigma_next)
            h = lam_next - lam
            phi1 = math.expm1(-h)
            x = (sigma_next / sigma) * x - phi1 * denoised
            if this >= 2:
                d_prev, lam_prev = history[-1]
                r0 = (lam - lam_prev) / h
                d1_0 = (denoised - d_prev) / r0
                if this == 2:
                    x = x - 0.5 * phi1 * d1_0
                else:
                    d_prev2, lam_prev2 = history[-2]
                    r1 = (lam_prev - lam_prev2) / h
                    d1_1 = (d_prev - d_prev2) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1) * (2.0 if taylor_d2 else 1.0)
                    x = x + (phi1 / h + 1.0) * d1 - ((phi1 + h) / h**2 - 0.5) * d2
        history = (history + [(denoised, _lambda(sigma))])[-2:]
        _report(callback, x, i, sigma, denoised)
    return x


def _unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[Tensor, Tensor]:
    """R (order x order, rows r_k^(i-1)) and b (b_i = h phi_{i+1}(h) i! / B(h)) of UniPC's linear system with the
    B(h) = e^h - 1 ("bh2") choice (Zhao et al. 2023, "UniPC", Algorithm 3 / appendix, eq. for rho), in float64."""
    rk = torch.tensor(rks + [1.0], dtype=torch.float64)
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(rk ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.stack(rows), torch.tensor(b, dtype=torch.float64)


@torch.no_grad()
def sample_unipc(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    order: int = 2,
    corrector: bool = True,
    lower_order_final: bool = True,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models", Algorithms 2-3), data prediction with B(h) = e^h - 1 ("bh2"), diffusers' default: the UniP-p predictor
    and, after each model evaluation, the UniC corrector that reuses that evaluation to raise the previous step's
    order by one (no extra evaluations). Orders per step: min(order, i + 1, steps - i) (without
    `lower_order_final`: min(order, i + 1)); a last step to sigma = 0 is x_0 = D. Order 2 fixes the predictor's rho to 1/2 (the paper's simplified UniP-2). Matches
    diffusers' `UniPCMultistepScheduler(solver_order=order)`."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    steps = len(sigmas) - 1
    ms: list[tuple[Tensor, float]] = []  # (D, lambda) history, newest last
    last_x, last_order, last_h = None, 0, 0.0
    for i, sigma, sigma_next in _steps(sigmas, f"UniPC-{order}", progress):
        denoised = _denoise(model, x, sigma)
        lam = _lambda(sigma)
        if corrector and last_x is not None:  # UniC: correct x (from step i - 1) with the new evaluation
            m0, lam0 = ms[-1]
            h = last_h
            hh = -h
            rks, d1s = [], []
            for k in range(1, last_order):
                mk, lamk = ms[-(k + 1)]
                rk = (lamk - lam0) / h
                rks.append(rk)
                d1s.append((mk - m0) / rk)
            R, b = _unipc_coefficients(rks, hh, last_order)
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if last_order == 1 else torch.linalg.solve(R, b)
            x = (sigma / float(sigmas[i - 1])) * last_x - math.expm1(hh) * m0
            corr = sum(float(rho) * d for rho, d in zip(rhos_c[:-1], d1s, strict=True))
            x = x - math.expm1(hh) * (corr + float(rhos_c[-1]) * (denoised - m0))
        ms = (ms + [(denoised, lam)])[-order:]
        this = min(order, steps - i, len(ms)) if lower_order_final else len(ms)
        last_x = x
        if sigma_next == 0:
            x = denoised
        else:  # UniP-p predictor from sigma to sigma_next
            h = _lambda(sigma_next) - lam
            hh = -h
            m0 = denoised
            rks, d1s = [], []
            for k in range(1, this):
                mk, lamk = ms[-(k + 1)]
                rk = (lamk - lam) / h
                rks.append(rk)
                d1s.append((mk - m0) / rk)
            x = (sigma_next / sigma) * x - math.expm1(hh) * m0
            if d1s:
                if this == 2:
                    rhos_p = torch.tensor([0.5], dtype=torch.float64)
                else:
                    R, b = _unipc_coefficients(rks, hh, this)
                    rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
                x = x - math.expm1(hh) * sum(float(rho) * d for rho, d in zip(rhos_p, d1s, strict=True))
            last_h = h
        last_order = this
        _report(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_ipndm(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    max_order: int = 4,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator" (DEIS), appendix:
    the improved pseudo-numerical method of Liu et al. 2022 with lower-order warm-up): explicit Adams-Bashforth
    steps of orders 1-4 on the probability-flow ODE in sigma, with the fixed equal-step coefficients
    (3, -1) / 2, (23, -16, 5) / 12 and (55, -59, 37, -9) / 24 applied to the last derivatives d = (x~ - D) / sigma.
    One evaluation per step; every step, the last one included, uses the multistep formula.

    The coefficients are those of equal steps in sigma, so the fourth order holds only there: on a grid uniform
    in sigma the error falls 10-13x per halving of 32-256 steps (towards 16x when the warm-up steps are exact), on
    unequal steps (the Karras rho = 7 grid of `continuous_sample`, or steps uniform in log sigma) the method is
    second order, 4x per halving at every step count, for max_order 2, 3 and 4 alike. Its Euler first step (local
    error O(h^2)) also makes it second order on the uniform grid beyond some 500 steps (tests/test_ode_samplers.py
    measures both grids)."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"iPNDM max_order must be 1-4, got {max_order}")
    coefficients = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
    ds: list[Tensor] = []  # newest first
    for i, sigma, sigma_next in _steps(sigmas, "iPNDM", progress):
        denoised = _denoise(model, x, sigma)
        ds = ([to_d(x, sigma, denoised)] + ds)[:max_order]
        d = sum(c * dk for c, dk in zip(coefficients[len(ds)], ds, strict=True))
        x = x + (sigma_next - sigma) * d
        _report(callback, x, i, sigma, denoised)
    return x


# ---------------------------------------------------------------------------------------------- SDE samplers
def _score(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """grad log p(x~; sigma) = (D(x~; sigma) - x~) / sigma^2 (Tweedie's formula; EDM eq. 3)."""
    return (denoised - x) / sigma**2


@torch.no_grad()
def sample_euler_maruyama(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6) in the x~ variable, with u = sigma^2 as time:
    dx~ = -grad log p du + dw-bar_u, so one step from sigma to sigma_next is

        x~_next = x~ + (sigma^2 - sigma_next^2) grad log p(x~; sigma) + sqrt(sigma^2 - sigma_next^2) z,

    Song et al.'s VE Euler-Maruyama / reverse-diffusion predictor (their eq. 47 and Algorithm 2, predictor). The VP
    SDE is this SDE after the rescaling x~ = x / alpha (EDM eq. 4-6), so it serves VP models too. The last step to
    sigma = 0 returns the denoised mean D without noise (Song et al.'s final "noise removal" step)."""
    for i, sigma, sigma_next in _steps(sigmas, "Euler-Maruyama", progress):
        denoised = _denoise(model, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            dvar = sigma**2 - sigma_next**2
            x = x + dvar * _score(x, sigma, denoised) + math.sqrt(dvar) * randn_like(x, generator)
        _report(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_pc(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    snr: float = 0.16,
    corrector_steps: int = 1,
    generator: Generator = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 2 with the Langevin corrector of Algorithm 4):
    at each noise level `corrector_steps` Langevin MCMC steps

        g = grad log p(x~; sigma), z ~ N(0, I), eps = 2 (snr ||z|| / ||g||)^2,   x~ <- x~ + eps g + sqrt(2 eps) z

    (step size set by the signal-to-noise ratio `snr`, 0.16 in the paper for CIFAR-10), then one
    `sample_euler_maruyama` predictor step to the next level; (corrector_steps + 1) evaluations per level. The
    norms are per sample (Song et al.'s code averages them over the batch), so a sample does not depend on its
    batch. The corrector runs before each predictor step, as in their code; the last step returns D."""
    if snr <= 0 or corrector_steps < 0:
        raise ValueError(f"need snr > 0 and corrector_steps >= 0, got {snr}, {corrector_steps}")
    for i, sigma, sigma_next in _steps(sigmas, "PC", progress):
        for _ in range(corrector_steps):  # Algorithm 4: Langevin corrector at level sigma
            g = _score(x, sigma, _denoise(model, x, sigma))
            z = randn_like(x, generator)
            ratio = z.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
            step = (2.0 * (snr * ratio) ** 2).reshape(-1, *([1] * (x.ndim - 1)))
            x = x + step * g + (2.0 * step).sqrt() * z
        denoised = _denoise(model, x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            dvar = sigma**2 - sigma_next**2
            x = x + dvar * _score(x, sigma, denoised) + math.sqrt(dvar) * randn_like(x, generator)
        _report(callback, x, i, sigma, denoised)
    return x


# ---------------------------------------------------------------------------------------------- dispatch
# Each built-in SDE / ODE sampler: how `continuous_sample` runs it on the denoiser and the Karras grid, with the
# options it reads (`--model.sampling.options`) and their defaults. One entry here is all a new sampler needs:
# `samplers.BUILTIN_SAMPLERS`, the option checks and `SamplerSettings` read this table.
def _run_euler_maruyama(denoiser, x, sigmas, generator, progress, callback, **options):
    return sample_euler_maruyama(denoiser, x, sigmas, generator=generator, progress=progress, callback=callback)


def _run_pc(denoiser, x, sigmas, generator, progress, callback, snr=None, corrector_steps=None):
    return sample_pc(denoiser, x, sigmas, snr=0.16 if snr is None else snr,
                     corrector_steps=1 if corrector_steps is None else int(corrector_steps), generator=generator,
                     progress=progress, callback=callback)  # fmt: skip


def _run_heun(denoiser, x, sigmas, generator, progress, callback, churn=None):
    return sample_heun(denoiser, x, sigmas, churn=churn or 0.0, generator=generator, progress=progress,
                       callback=callback)  # fmt: skip


def _run_dpmpp_3m(denoiser, x, sigmas, generator, progress, callback):
    return sample_dpmpp_3m(denoiser, x, sigmas, progress=progress, callback=callback)


def _run_unipc(denoiser, x, sigmas, generator, progress, callback, solver_order=None):
    order = (None if solver_order is None else int(solver_order)) or 2
    return sample_unipc(denoiser, x, sigmas, order=order, progress=progress, callback=callback)


def _run_ipndm(denoiser, x, sigmas, generator, progress, callback, solver_order=None):
    max_order = (None if solver_order is None else int(solver_order)) or 4
    return sample_ipndm(denoiser, x, sigmas, max_order=max_order, progress=progress, callback=callback)


# name -> (runner, the options it reads besides `rho` and `quantize`, which every one of them reads)
K_SAMPLERS: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "euler_maruyama": (_run_euler_maruyama, ()),
    "pc": (_run_pc, ("snr", "corrector_steps")),
    "heun": (_run_heun, ("churn",)),
    "dpmpp_3m": (_run_dpmpp_3m, ()),
    "unipc": (_run_unipc, ("solver_order",)),
    "ipndm": (_run_ipndm, ("solver_order",)),
}
CONTINUOUS_SAMPLERS = tuple(K_SAMPLERS)
# The options `continuous_sample` takes beyond the common ones (`--model.sampling.options` in the command line), and
# which sampler reads which: an option given to a sampler that does not read it is refused, never ignored.
CONTINUOUS_OPTIONS = ("rho", "churn", "snr", "corrector_steps", "solver_order", "quantize")
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    name: ("rho", *options, "quantize") for name, (_, options) in K_SAMPLERS.items()
}


def unread_options(sampler: str, names: Sequence[str]) -> list[str]:
    """The names among `names` (of CONTINUOUS_OPTIONS) that the continuous sampler `sampler` does not read."""
    return [name for name in names if name not in SAMPLER_OPTIONS[sampler]]


def readers(option: str) -> list[str]:
    """The continuous samplers that read `option`."""
    return [name for name, options in SAMPLER_OPTIONS.items() if option in options]


def continuous_sample(
    model: Callable[..., Tensor],
    x_T: Tensor,
    schedule: NoiseSchedule,
    sampler: str,
    steps: int = 10,
    generator: Generator = None,
    prediction: str = "eps",
    progress: bool = False,
    rho: float | None = None,
    churn: float | None = None,
    snr: float | None = None,
    corrector_steps: int | None = None,
    solver_order: int | None = None,
    quantize: bool | None = None,
    clip_x0: X0Clip = False,
    callback: Callback | None = None,
) -> Tensor:
    """Sample with `sampler` (one of CONTINUOUS_SAMPLERS) from x_T ~ N(0, I) of a DDPM network `model(x_t, t)`.

    The network is wrapped as the VP denoiser (`DiscreteVPDenoiser`); the grid is `steps` Karras levels (`rho`,
    default 7) from the schedule's sigma_max to sigma_min, then 0. The model is called at the exact, fractional
    timestep of each level (k-diffusion's default; the UNet's sinusoidal embedding, `EpsPredictor`'s conversion and
    both guidances take it); `quantize` rounds it to the nearest integer instead, for a model that only knows the
    T discrete ones.
    `churn` (heun, default 0), `snr` and `corrector_steps` (pc, defaults 0.16 and 1), `solver_order` (unipc: its order,
    default 2; ipndm: its maximum order, default 4). An option the sampler does not read (`SAMPLER_OPTIONS`) is a
    ValueError: DPM-Solver++(3M) has no order to choose (the published update, second order: `sample_dpmpp_3m`).
    `clip_x0` bounds the denoised image at every evaluation (`parameterization.threshold_x0`); `callback` sees every
    step ({"x", "i", "sigma", "denoised"}, x in the x~ variable)."""
    if sampler not in K_SAMPLERS:
        raise ValueError(f"unknown continuous sampler {sampler!r}; choose one of {', '.join(CONTINUOUS_SAMPLERS)}")
    given = {"rho": rho, "churn": churn, "snr": snr, "corrector_steps": corrector_steps, "solver_order": solver_order}
    unread = unread_options(sampler, [name for name, value in given.items() if value is not None])
    if unread:
        read_by = "; ".join(f"{name} is read by {', '.join(readers(name))}" for name in unread)
        raise ValueError(f"sampler {sampler!r} does not read {', '.join(unread)} ({read_by}); it takes "
                         f"{', '.join(SAMPLER_OPTIONS[sampler])}")  # fmt: skip
    denoiser = DiscreteVPDenoiser(model, schedule, prediction, bool(quantize), clip_x0)
    sigmas = karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, 7.0 if rho is None else rho)
    x = x_T * math.sqrt(1.0 + denoiser.sigma_max**2)  # x~ = x_T / sqrt(a_T)
    run, reads = K_SAMPLERS[sampler]
    options = {name: given[name] for name in reads if given[name] is not None}
    return run(denoiser, x, sigmas, generator, progress, callback, **options)
