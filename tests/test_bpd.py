"""Bits/dim from the variational bound: Gaussian KL, the discretized decoder, and the whole bound on Gaussian data
with the exact eps-predictor against its closed form and the data's entropy."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.utils.data import DataLoader

from src.diffusion.likelihood import (
    bound_timesteps,
    discretized_gaussian_log_likelihood,
    model_log_variance,
    nll_bits_per_dim,
    normal_kl,
    posterior_log_variance,
)
from src.diffusion.schedule import NoiseSchedule
from src.module import DiffusionModule
from src.options import Evaluation, Sampling, Schedule

BIN = 2.0 / 255.0  # width of one 8-bit level on [-1, 1]


def test_normal_kl_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("mean, log_scale", [(0.0, -4.0), (0.3, -1.0), (-0.99, -5.0), (1.0, -6.0), (0.5, 1.0)])
def test_discretized_gaussian_sums_to_one_over_256_levels(mean: float, log_scale: float) -> None:
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
    )
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # an interior level is the Gaussian mass of its bin
    k = 128
    expected = norm.cdf((float(levels[k]) + BIN / 2 - mean) / math.exp(log_scale)) - norm.cdf(
        (float(levels[k]) - BIN / 2 - mean) / math.exp(log_scale)
    )
    assert float(log_p[k].exp()) == pytest.approx(max(expected, 1e-12), rel=1e-9, abs=1e-15)


def test_bound_timesteps_are_exact_or_stratified() -> None:
    full = bound_timesteps(50, batch_size=3)
    assert [int(t[0]) for t, _ in full] == list(range(1, 50)) and all(w == 1 for _, w in full)
    part = bound_timesteps(50, batch_size=3, num=7, generator=torch.Generator().manual_seed(0))
    assert sum(w for _, w in part) == 49 and len(part) == 7
    assert all(1 <= int(t.min()) and int(t.max()) <= 49 for t, _ in part)


def expected_bound_nats(schedule: NoiseSchedule, mu: float, s: float) -> float:
    """E over x_0 ~ N(mu, s^2) of L_vlb per dimension for the exact eps-predictor, from closed forms.

    With Gaussian data x_0 | x_t is Gaussian with variance V_t = s^2 (1 - a_t) / (a_t s^2 + 1 - a_t), and the
    exact model's x0_hat = E[x_0 | x_t], so q's and p's posterior means differ by coef_x0 (x_0 - x0_hat):
      KL_t  = 0.5 (log v_p - log v_q + v_q / v_p - 1) + coef_x0_t^2 V_t / (2 v_p)
      prior = KL(N(sqrt(a_T) x_0, 1 - a_T) || N(0, 1)) averaged over x_0
      L_0   = E_{r ~ N(0, V_0)} -log(Phi((r + w/2) / sigma_0) - Phi((r - w/2) / sigma_0))  (Gauss-Hermite)
    """
    a = schedule.alphas_cumprod.numpy()
    coef = schedule.posterior_mean_coef_x0.numpy()
    lv_p, lv_q = model_log_variance(schedule).numpy(), posterior_log_variance(schedule).numpy()
    V = s * s * (1 - a) / (a * s * s + 1 - a)
    kl = 0.5 * (lv_p - lv_q + np.exp(lv_q - lv_p) - 1) + 0.5 * coef**2 * V * np.exp(-lv_p)
    a_T = a[-1]
    prior = 0.5 * (-np.log(1 - a_T) + (1 - a_T) + a_T * (mu * mu + s * s) - 1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(41)
    r = -np.abs(nodes) * math.sqrt(V[0])  # the lower tail, where the CDF difference does not cancel
    sd = math.exp(0.5 * lv_p[0])
    decoder = np.sum(weights * -np.log(norm.cdf((r + BIN / 2) / sd) - norm.cdf((r - BIN / 2) / sd))) / weights.sum()
    return float(prior + kl[1:].sum() + decoder)


def test_bound_of_exact_gaussian_model_matches_closed_form_and_entropy() -> None:
    """x_0 ~ N(0, s^2) per pixel (continuous), s = 0.05, and the exact eps-predictor
    eps(x_t, t) = sqrt(1 - a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t).

    Target. For data binned at width w = 2/255 on a density smooth at that scale, -log P(bin) ~ -log(p(x) w), so
    the best achievable NLL per dimension is H(x) - log w = 0.5 log(2 pi e s^2) - log(2/255) (4.7195 bits here).
    The bound can only exceed it: by sum_t E KL(q(x_{t-1}|x_t) || p(x_{t-1}|x_t)), nonzero because DDPM's fixed
    variances differ from the true reverse ones, and by the decoder's variance mismatch.

    Schedule where the bound is tight. With DDPM's betas (1e-4 .. 0.02) the step t's mismatch ratio is
    ~ beta_t / sum_{s<t} beta_s ~ 1/t, so the gap tends to a constant (0.55 bits here) whatever T. Starting the
    betas at s^2 instead makes the data's variance s^2 small against 1 - a_t from the first steps on (x_0 | x_t
    close to its prior, mismatch ~ s^2 / (beta t^2)), and makes the decoder's variance beta-tilde_1 = beta/2
    equal Var(x_0 | x_1) = s^2 beta / (s^2 + beta) = s^2 / 2, smooth on the bin scale (std 0.035 vs w = 0.0078).
    The remaining gap, from the closed form below, is 0.041 bits.

    Checks: the Monte Carlo bound (all T = 1000 terms) equals the closed-form expectation within its sampling
    error, and both are within 0.06 bits of H(x) - log w.
    """
    mu, s = 0.0, 0.05
    schedule = NoiseSchedule.linear(1000, s * s, 0.02)

    def exact_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s * s + 1 - a)

    x0 = mu + s * torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bpd = nll_bits_per_dim(exact_eps, x0, schedule, generator=torch.Generator().manual_seed(1))["bpd"]
    mc, sem = float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd)))
    closed = expected_bound_nats(schedule, mu, s) / math.log(2)
    entropy = (0.5 * math.log(2 * math.pi * math.e * s * s) - math.log(BIN)) / math.log(2)
    assert closed == pytest.approx(4.7609, abs=2e-3) and 0 < closed - entropy < 0.06
    assert abs(mc - closed) < 5 * sem + 1e-3, (mc, closed, sem)
    assert abs(mc - entropy) < 0.06 + 5 * sem

    # Stratified subsampling of the KL terms is unbiased: 100 of the 999 terms give the same value.
    sub = nll_bits_per_dim(exact_eps, x0, schedule, num_timesteps=100, generator=torch.Generator().manual_seed(2))
    assert abs(float(sub["bpd"].mean()) - closed) < 5 * float(sub["bpd"].std() / math.sqrt(len(bpd))) + 1e-3


def test_module_test_step_logs_bpd(tmp_path: Path, tiny_unet) -> None:
    net = tiny_unet()
    module = DiffusionModule(
        net, schedule=Schedule(timesteps=20), sampling=Sampling(steps=2), evaluation=Evaluation(bpd_timesteps=4)
    )
    images = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    loader = DataLoader(list(zip(images, torch.zeros(6, dtype=torch.int64), strict=True)), batch_size=3)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    metrics = trainer.test(module, loader)[0]
    assert "test/loss" in metrics and np.isfinite(metrics["test/bpd"]) and metrics["test/bpd"] > 0


def test_edge_bins_have_the_same_floor_as_interior_bins() -> None:
    """A confident wrong prediction at x = -1 or x = +1 costs at most -log(1e-12) nats, as in the official code
    (and as an interior pixel already did), instead of an unbounded NLL."""
    x = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    mean = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # each far from x
    log_p = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(1e-3)))
    torch.testing.assert_close(log_p, torch.full_like(x, math.log(1e-12)), rtol=0, atol=1e-12)
    # Reference: the official formula, clamp(min=1e-12) on each bin's probability.
    log_scale = torch.full_like(x, math.log(0.5))
    upper, lower = (x - mean + 1 / 255) / 0.5, (x - mean - 1 / 255) / 0.5
    cdf_plus, cdf_min = norm.cdf(upper.numpy()), norm.cdf(lower.numpy())
    expected = np.where(x.numpy() < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                        np.where(x.numpy() > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)),
                                 np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))  # fmt: skip
    np.testing.assert_allclose(discretized_gaussian_log_likelihood(x, mean, log_scale).numpy(), expected, rtol=1e-9)


def test_module_test_step_logs_the_probability_flow_likelihood(tmp_path: Path, tiny_unet) -> None:
    """`test` under Lightning's inference mode still gets the ODE's divergence gradients."""
    net = tiny_unet()
    module = DiffusionModule(
        net,
        schedule=Schedule(timesteps=20),
        sampling=Sampling(steps=2),
        evaluation=Evaluation(bpd_timesteps=4, ode_bpd_batches=1),
    )
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    loader = DataLoader(list(zip(images, torch.zeros(4, dtype=torch.int64), strict=True)), batch_size=2)
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    metrics = trainer.test(module, loader)[0]
    assert np.isfinite(metrics["test/ode_bpd"]) and metrics["test/ode_bpd"] > 0
