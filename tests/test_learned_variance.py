"""Improved DDPM's learned variance (Nichol & Dhariwal 2021): the ancestral sampler with Sigma_theta, respacing,
and the L_vlb term of L_hybrid against closed-form Gaussian KLs and an independent decoder likelihood."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from src.diffusion.losses import l_hybrid, learned_variance_vb
from src.diffusion.samplers import ddim_sample, ddpm_sample, respace, sample
from src.diffusion.schedule import NoiseSchedule

try:
    from test_samplers import MU, GaussianEps, S
except ImportError:  # pragma: no cover
    from tests.test_samplers import MU, GaussianEps, S

T = 100
SCHEDULE = NoiseSchedule.linear(T, 1e-3, 0.1)  # few steps, same shape as DDPM's schedule
EPS = GaussianEps(MU, S, SCHEDULE.alphas_cumprod)
X_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def with_v(value: float):
    """The Gaussian eps-model with a constant variance output v (the learned-variance net's 2C channels)."""
    return lambda x, t: torch.cat([EPS(x, t), torch.full_like(x, value)], dim=1)


@pytest.mark.parametrize("v, fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_variance_at_the_ends_is_fixed_small_or_large(v: float, fixed: str) -> None:
    learned = ddpm_sample(with_v(v), X_T, SCHEDULE, "learned", torch.Generator().manual_seed(1))
    reference = ddpm_sample(EPS, X_T, SCHEDULE, fixed, torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned, reference, rtol=0, atol=1e-12)


def test_learned_variance_interpolates_log_variances() -> None:
    """v = 0 gives the variance sqrt(beta beta-tilde) (geometric mean): the noise scale of one step (T = 2)."""
    schedule = NoiseSchedule(torch.tensor([0.1, 0.3], dtype=torch.float64))
    zero = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)  # noqa: E731  eps = 0, v = 0
    x = torch.zeros(20000, 1, dtype=torch.float64)
    calls = []
    ddpm_sample(zero, x, schedule, "learned", torch.Generator().manual_seed(0), callback=lambda d: calls.append(d))
    expected = (0.3 * float(schedule.posterior_variance[1])) ** 0.25  # the standard deviation
    assert abs(calls[0]["x"].std().item() - expected) < 0.02 * expected


def test_respace_keeps_alphas_cumprod() -> None:
    seq = [0, 7, 30, 61, 99]
    respaced = respace(SCHEDULE, seq)
    torch.testing.assert_close(respaced.alphas_cumprod, SCHEDULE.alphas_cumprod[seq], rtol=1e-14, atol=0)


def test_respaced_fixed_small_ddpm_is_ddim_eta_1() -> None:
    """On a sub-sequence, beta-tilde of the respaced schedule is DDIM's sigma(eta = 1)^2 (DDIM eq. 16)."""
    seq = [0, 9, 19, 39, 59, 79, 99]
    ddpm = ddpm_sample(EPS, X_T, SCHEDULE, "fixed_small", torch.Generator().manual_seed(2), timesteps=seq)
    ddim = ddim_sample(EPS, X_T, SCHEDULE, eta=1.0, timesteps=seq, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ddpm, ddim, rtol=0, atol=1e-12)
    learned = ddpm_sample(with_v(-1.0), X_T, SCHEDULE, "learned", torch.Generator().manual_seed(2), timesteps=seq)
    torch.testing.assert_close(learned, ddpm, rtol=0, atol=1e-12)


def test_ddpm_respaced_dispatch_calls_the_model_at_original_timesteps() -> None:
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return with_v(0.3)(x, t)

    sample(model, X_T, SCHEDULE, sampler="ddpm_respaced", steps=10, variance="learned",
           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert seen == list(range(90, -1, -10))


def kl_gauss(m1, v1, m2, v2):
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def test_vlb_term_is_the_closed_form_gaussian_kl() -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 5, 20, 50, 80, 99])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # an imperfect prediction
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    got = learned_variance_vb(eps_hat, v, x0, x_t, t, SCHEDULE)
    # Independently, in numpy, from the DDPM paper's formulas (eqs. 6, 7, 15) and improved DDPM eq. 15.
    betas = SCHEDULE.betas.numpy()
    a = np.cumprod(1 - betas)
    for i, ti in enumerate(t.tolist()):
        a_t, a_prev, b = a[ti], a[ti - 1], betas[ti]
        xt, x0i, e, vi = x_t[i].numpy(), x0[i].numpy(), eps_hat[i].numpy(), v[i].numpy()
        x0_hat = (xt - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        c0, ct = np.sqrt(a_prev) * b / (1 - a_t), np.sqrt(1 - b) * (1 - a_prev) / (1 - a_t)
        post_var = b * (1 - a_prev) / (1 - a_t)
        frac = (vi + 1) / 2
        model_var = np.exp(frac * np.log(b) + (1 - frac) * np.log(post_var))
        kl = kl_gauss(c0 * x0i + ct * xt, post_var, c0 * x0_hat + ct * xt, model_var)
        assert abs(got[i].item() - kl.mean() / np.log(2)) < 1e-12


def test_vlb_term_at_t0_is_the_discretized_decoder_nll() -> None:
    x0 = (torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2) * 127.5).round() / 127.5
    t = torch.zeros(1, dtype=torch.int64)
    noise = torch.full_like(x0, 0.5)
    x_t = SCHEDULE.q_sample(x0, t, noise)
    eps_hat, v = noise * 0.9, torch.full_like(x0, 0.2)
    got = learned_variance_vb(eps_hat, v, x0, x_t, t, SCHEDULE).item()
    a_t, b = float(SCHEDULE.alphas_cumprod[0]), float(SCHEDULE.betas[0])
    mean = ((x_t - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)).flatten().numpy()  # coef_x0 = 1, coef_xt = 0
    post_var1 = float(SCHEDULE.posterior_variance[1])  # beta-tilde_0 = 0 is replaced by beta-tilde_1
    std = math.exp(0.5 * (0.6 * math.log(b) + 0.4 * math.log(post_var1)))
    lo, hi = x0.flatten().numpy() - 1 / 255, x0.flatten().numpy() + 1 / 255
    cdf_hi = np.where(x0.flatten().numpy() > 0.999, 1.0, norm.cdf((hi - mean) / std))
    cdf_lo = np.where(x0.flatten().numpy() < -0.999, 0.0, norm.cdf((lo - mean) / std))
    expected = -np.log(cdf_hi - cdf_lo).mean() / np.log(2)
    assert abs(got - expected) < 1e-9 * max(1.0, abs(expected))


def test_hybrid_loss_stops_the_vlb_gradient_into_the_mean() -> None:
    x0 = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(4)) * 2 - 1
    eps_param = torch.nn.Parameter(torch.zeros(1))
    v_param = torch.nn.Parameter(torch.zeros(1))

    def model(x, t):
        return torch.cat([x * 0 + eps_param, x * 0 + v_param], dim=1)

    terms = l_hybrid(model, x0, SCHEDULE, t=torch.arange(1, 9) * 10, noise=torch.ones_like(x0))
    (grad_eps_from_vb, grad_v) = torch.autograd.grad(terms["vb"].sum(), [eps_param, v_param], allow_unused=True)
    # The slice of the concatenated output hands the eps half an all-zero gradient (or none).
    assert (grad_eps_from_vb is None or not grad_eps_from_vb.any()) and grad_v.abs() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + 1e-3 * T * terms["vb"].float())
