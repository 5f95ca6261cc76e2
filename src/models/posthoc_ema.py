"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Section 3 and Appendix C): train once, choose the EMA length afterwards.

Power-function EMA. The average at training step t weighs the weights theta_tau of every earlier step by a power of
tau: p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 < tau <= t (EDM2 Eq. 2), tracked step by step as

    theta_ema <- beta_t theta_ema + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1)   (EDM2 Eq. 3)

(t = 1, 2, ...; beta_1 = 0, so the first update copies the weights and the initialisation has no weight). Its
length is given relative to the training so far, sigma_rel = std of the profile / t (EDM2 Eq. 4):

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),   sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.

Reconstruction (EDM2 Appendix C.3). Snapshots i of such averages, taken at steps t_i with exponents gamma_i, have
profiles p_i; any other profile q (another gamma, an earlier step) is approximated by sum_i x_i p_i with the x that
minimises the L2 distance between the profiles, int (sum_i x_i p_i - q)^2 dtau: the normal equations A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, q>, inner products in closed form (`profile_inner_product`). The reconstructed
weights are sum_i x_i theta_i of the snapshots. Two tracked lengths (EDM2 tracks 0.05 and 0.10) snapshotted every
N steps span the profiles in between and around them well; the fit is only as good as the snapshots are many.

The template's warm-up EMA, decay min(d, (1 + n) / (10 + n)) at step n (src/models/ema.py), is itself one of these
until it reaches its cap d: unrolled, the weight of the step-n weights in the average after step N is
9 (n + 2)(n + 3)...(n + 9) / ((N + 2)(N + 3)...(N + 10)), a degree-8 polynomial in n, that is EDM2's tau^8 profile
(gamma = 8, sigma_rel = 0.0905) with the time origin shifted by about 6 steps (`warmup_ema_weights`). The
quickstart's decay cap 0.999 is reached only after step 8,991, so its EMA is the gamma = 8 average throughout a
15-minute CPU run.

Torch only, in float64 (the model layer's rule): the Lightning callback that tracks and snapshots is
src/callbacks/posthoc_ema.py, the command that reconstructs is src/posthoc_ema.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from src.errors import ConfigError

Float64 = torch.float64


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function profile with exponent gamma > -1 (EDM2 Eq. 4)."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"power-function EMA exponent gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


# The largest sigma_rel a power function reaches (0.30028, at gamma = -0.382): longer averages have no gamma.
MAX_SIGMA_REL = 0.3002


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile of relative length sigma_rel: the largest real root of
    sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, i.e. gamma^3 + 7 gamma^2 + (16 - s) gamma + 12 - s = 0 with
    s = 1 / sigma_rel^2 (EDM2 Eq. 4 solved for gamma, as their reference code does)."""
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel must be in (0, {MAX_SIGMA_REL}] (an EMA length relative to the training so far, e.g. 0.05 "
            f"or 0.10), got {sigma_rel}"
        )
    s = sigma_rel**-2
    # The roots of the monic cubic x^3 + a x^2 + b x + c are the eigenvalues of its companion matrix.
    a, b, c = 7.0, 16.0 - s, 12.0 - s
    companion = torch.tensor([[-a, -b, -c], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=Float64)
    roots = torch.linalg.eigvals(companion)
    real = roots.real[(roots.imag.abs() < 1e-7) & (roots.real > -1.0)]
    # Polish the largest root by Newton steps (the eigenvalue solver leaves ~1e-13 relative error).
    gamma = float(real.max())
    for _ in range(3):
        gamma -= (((gamma + a) * gamma + b) * gamma + c) / ((3.0 * gamma + 2.0 * a) * gamma + b)
    return gamma


def power_ema_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of EDM2 Eq. 3 for the update after training step t = `step` >= 1."""
    if step < 1:
        raise ValueError(f"power-function EMA steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def warmup_ema_weights(num_steps: int) -> Tensor:
    """The weight of each step's weights theta_1 .. theta_N in the warm-up EMA after N = `num_steps` updates with
    decay (1 + n) / (10 + n) at step n (uncapped), and of the initial weights theta_0 first: entry n is
    9 (n + 2)...(n + 9) / ((N + 2)...(N + 10)) for n >= 1 and 10! / ((N + 2)...(N + 10)) for n = 0 (module
    docstring). float64; sums to 1."""
    n = torch.arange(num_steps + 1, dtype=Float64)
    log_den = sum(math.log(num_steps + i) for i in range(2, 11))
    log_num = sum(torch.log(n + i) for i in range(2, 10))
    weights = 9.0 * torch.exp(log_num - log_den)
    weights[0] = math.exp(math.lgamma(11) - log_den)
    return weights


def profile_inner_product(
    step_a: Tensor | float, gamma_a: Tensor | float, step_b: Tensor | float, gamma_b: Tensor | float
) -> Tensor:
    """<p_a, p_b> = int p_a(tau) p_b(tau) dtau of two power-function profiles p(tau) = (g + 1) tau^g / t^(g + 1) on
    (0, t]: with t_a <= t_b, (g_a + 1)(g_b + 1) (t_a / t_b)^g_b / ((g_a + g_b + 1) t_b) (EDM2 Appendix C.3);
    broadcasts."""
    t_a, g_a, t_b, g_b = (torch.as_tensor(v, dtype=Float64) for v in (step_a, gamma_a, step_b, gamma_b))
    first_shorter = t_a <= t_b
    t_short, t_long = torch.where(first_shorter, t_a, t_b), torch.where(first_shorter, t_b, t_a)
    g_long = torch.where(first_shorter, g_b, g_a)
    return (g_a + 1.0) * (g_b + 1.0) * (t_short / t_long) ** g_long / ((g_a + g_b + 1.0) * t_long)


def _normal_equations(
    steps: Iterable[float], gammas: Iterable[float], target_step: float, target_gamma: float
) -> tuple[Tensor, Tensor]:
    """A_ij = <p_i, p_j> of the snapshots' profiles and b_i = <p_i, q> with the target's (module docstring)."""
    t = torch.as_tensor(list(steps), dtype=Float64)
    g = torch.as_tensor(list(gammas), dtype=Float64)
    if t.shape != g.shape or t.numel() == 0:
        raise ValueError(f"need as many snapshot steps as exponents, at least one; got {t.numel()} and {g.numel()}")
    if bool((t < 1).any()) or target_step < 1:
        raise ValueError("snapshot and target steps count from 1")
    gram = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    return gram, profile_inner_product(t, g, float(target_step), float(target_gamma))


def posthoc_coefficients(
    steps: Iterable[float], gammas: Iterable[float], target_step: float, target_gamma: float
) -> Tensor:
    """The x of the least-squares fit sum_i x_i p_i ~ q of the target profile q (target_step, target_gamma) by the
    snapshots' profiles p_i (steps[i], gammas[i]): the solution of A x = b (module docstring). A is symmetric
    positive semi-definite; an SVD-based lstsq so that repeated snapshots (a singular A) still give the minimum-norm
    x. float64."""
    gram, target = _normal_equations(steps, gammas, target_step, target_gamma)
    return torch.linalg.lstsq(gram, target[:, None], driver="gelsd").solution[:, 0]


def profile_error(steps: Iterable[float], gammas: Iterable[float], coefficients: Tensor, target_step: float,
                  target_gamma: float) -> float:  # fmt: skip
    """Relative L2 error of the fitted profile, ||sum_i x_i p_i - q|| / ||q||: how well the snapshots can express
    the target (0 for a target that is one of them)."""
    gram, cross = _normal_equations(steps, gammas, target_step, target_gamma)
    x = torch.as_tensor(coefficients, dtype=Float64)
    qq = float(profile_inner_product(target_step, target_gamma, target_step, target_gamma))
    squared = float(x @ gram @ x - 2.0 * x @ cross + qq)
    return math.sqrt(max(squared, 0.0) / qq)


@torch.no_grad()
def update_power_ema(averaged: Iterable[Tensor], weights: Iterable[Tensor], step: int, gamma: float) -> None:
    """One update of EDM2 Eq. 3 in place: averaged <- beta_t averaged + (1 - beta_t) weights (one fused lerp)."""
    averaged, weights = list(averaged), [w.detach() for w in weights]
    torch._foreach_lerp_(averaged, weights, 1.0 - power_ema_beta(step, gamma))


@torch.no_grad()
def combine_state_dicts(weighted: Iterable[tuple[float, Mapping[str, Tensor]]]) -> dict[str, Tensor]:
    """sum_i x_i state_i over (x_i, state_i) pairs, read one at a time (memory: one state dict and the sum), summed
    in float64 and returned as float32. Non-floating entries (counters) are taken from the last state."""
    total: dict[str, Tensor] = {}
    for coefficient, state in weighted:
        for key, value in state.items():
            if not value.is_floating_point():
                total[key] = value.clone()
            elif key in total:
                total[key].add_(value.double(), alpha=float(coefficient))
            else:
                total[key] = value.double() * float(coefficient)
    return {k: v.float() if v.is_floating_point() else v for k, v in total.items()}


# `--model.guidance.model posthoc_ema@<fraction>[,<sigma_rel>]`: autoguidance by the run's own early EMA.
EARLY_EMA = re.compile(r"^posthoc_ema@(?P<fraction>[0-9]*\.?[0-9]+)(?:,(?P<sigma_rel>[0-9]*\.?[0-9]+))?$")


def parse_early_ema(spec: str | None) -> tuple[float, float] | None:
    """(fraction, sigma_rel) of a `posthoc_ema@<fraction>[,<sigma_rel>]` guide (sigma_rel 0.05 by default); None
    for anything else (a guide file's path). A fraction outside (0, 1) is a one-line ConfigError."""
    match = EARLY_EMA.match(str(spec or ""))
    if match is None:
        return None
    fraction, sigma_rel = float(match["fraction"]), float(match["sigma_rel"] or 0.05)
    if not 0.0 < fraction < 1.0 or sigma_rel <= 0.0:
        raise ConfigError(f"--model.guidance.model {spec}: the fraction of the run is in (0, 1) and sigma_rel > 0")
    return fraction, sigma_rel
